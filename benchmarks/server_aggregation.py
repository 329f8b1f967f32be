"""Server aggregation of one round: fedelta's strategies against Flower's own
``aggregate_arrayrecords``, for 10, 50 and 100 clients: time and peak memory.

Every client reply is a real Flower ``RecordDict`` with a MiniLM-sized dense fp32
delta (LoRA r=8 on query/key/value/dense plus head, 338,690 values, ~1.35 MB) and
its example count. Flower's path is what a Flower ServerApp does: the Grid hands it
every reply of the round, then ``aggregate_arrayrecords`` averages them. fedelta's
path is what its round loop does with each reply as it arrives: decode and validate
it (names, shapes, dtypes, finite values), fold it into the strategy, drop it; then
``finish_round``. Time counts only aggregation work (decoding and folding for
fedelta, ``aggregate_arrayrecords`` for Flower), not making the replies; peak
memory is the process's resident memory above the level before the round, for
the whole round (holding replies included). Each cell runs in a fresh process.

    python benchmarks/server_aggregation.py   # writes results/server_aggregation.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
CLIENTS = (10, 50, 100)
CASES = {
    "flower aggregate_arrayrecords": None,
    "fedelta fedavg+naive": {},
    "fedelta fedadam+ffa": {"strategy.name": "fedadam", "strategy.lora": "ffa"},
    "fedelta fedavg+fedex": {"strategy.lora": "fedex"},
    "fedelta fedavg+flora": {"strategy.lora": "flora"},
    "fedelta fedavg+naive+median": {"strategy.robust": "median"},
}


def measure(name: str, clients: int) -> dict:
    """In this process: one round of ``clients`` replies through ``name``'s path."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    import psutil
    from flwr.app import ArrayRecord, MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    from fedelta import protocol
    from fedelta.build import build_strategy, model_spec
    from fedelta.compression import ClientMemory, UplinkCompression
    from fedelta.config import RunConfig
    from fedelta.lora import FOLD_PREFIX
    from fedelta.models import cached_model
    from fedelta.server.validation import read_update
    from fedelta.simulations.simulate import PeakMemory

    overrides = CASES[name]
    config = RunConfig().replace(**(overrides or {}))
    built = cached_model(model_spec(config, 2))
    strategy = build_strategy(config)
    global_state = strategy.initial_state(built.initial_state)
    layout = strategy.uplink_layout(
        {k: tuple(v.shape) for k, v in global_state.items() if not k.startswith(FOLD_PREFIX)}
    )
    compression = UplinkCompression(config.compression, config.seed)
    rng = np.random.default_rng(0)

    def reply(client: int) -> RecordDict:
        """What client ``client`` sends: its encoded delta and its example count."""
        import torch

        delta = {
            k: torch.from_numpy(rng.standard_normal(shape, dtype=np.float32) * 1e-3)
            for k, shape in layout.items()
        }
        metrics = MetricRecord({protocol.NUM_EXAMPLES: 100 + client, protocol.TRAIN_LOSS: 0.5})
        if overrides is None:  # Flower's form: arrays by name, weight in num-examples
            return RecordDict({"arrays": ArrayRecord(delta), "m": metrics})
        upload = compression.compress(delta, ClientMemory(), 1, client, None)
        return RecordDict({protocol.DELTA: upload, protocol.METRICS: metrics})

    baseline = psutil.Process().memory_info().rss
    seconds = 0.0
    with PeakMemory(interval=0.002) as memory:
        if overrides is None:
            replies = [reply(c) for c in range(clients)]  # the Grid returns all of them
            started = time.perf_counter()
            aggregate_arrayrecords(replies, protocol.NUM_EXAMPLES)
            seconds = time.perf_counter() - started
        else:
            strategy.begin_round(1, global_state, [config.lora.r] * clients, population=clients)
            for client in range(clients):
                content = reply(client)
                started = time.perf_counter()
                update = read_update(content, layout, compression, 1)
                strategy.accumulate(update.delta, update.metrics.num_examples, config.lora.r)
                del content, update
                seconds += time.perf_counter() - started
            started = time.perf_counter()
            strategy.finish_round(global_state)
            seconds += time.perf_counter() - started
    return {"seconds": seconds, "peak-mb": (memory.peak_bytes - baseline) / 1e6}


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        name, clients = json.loads(sys.argv[2])
        print(json.dumps(measure(name, clients)))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per cell")
    args = parser.parse_args()
    results: dict[str, dict[int, dict]] = {}
    for name in CASES:
        for clients in CLIENTS:
            runs = []
            for _ in range(args.repeats):
                out = subprocess.run(
                    [sys.executable, __file__, "--child", json.dumps([name, clients])],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
                runs.append(json.loads(out.strip().splitlines()[-1]))
            cell = {
                "seconds": sorted(r["seconds"] for r in runs)[len(runs) // 2],
                "peak-mb": sorted(r["peak-mb"] for r in runs)[len(runs) // 2],
            }
            results.setdefault(name, {})[clients] = cell
            print(name, clients, cell, flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "server_aggregation.json").write_text(json.dumps(results, indent=2) + "\n")
    head = " | ".join(f"{n} clients: s / peak MB" for n in CLIENTS)
    lines = [
        f"One round, median of {args.repeats} fresh processes per cell (2 CPU cores):",
        "",
        f"| aggregation | {head} | memory 100/10 |",
        "|---|" + "---:|" * (len(CLIENTS) + 1),
    ]
    for name, cells in results.items():
        parts = [f"{cells[n]['seconds']:.3f} / {cells[n]['peak-mb']:.1f}" for n in CLIENTS]
        growth = cells[CLIENTS[-1]]["peak-mb"] / max(cells[CLIENTS[0]]["peak-mb"], 1.0)
        lines.append(f"| {name} | " + " | ".join(parts) + f" | {growth:.1f}x |")
    (RESULTS / "server_aggregation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
