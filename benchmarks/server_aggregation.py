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
the whole round (holding replies included). Each cell runs in a fresh process;
each entry is one aggregation path, over every number of clients.

    python benchmarks/server_aggregation.py   # writes results/server_aggregation.{json,md}
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import harness

CLIENTS = (10, 50, 100)
RUNS = {
    "flower aggregate_arrayrecords": None,
    "fedelta fedavg+naive": {},
    "fedelta fedadam+ffa": {"strategy.optimizer": "fedadam", "strategy.lora": "ffa"},
    "fedelta fedavg+fedex": {"strategy.lora": "fedex"},
    "fedelta fedavg+flora": {"strategy.lora": "flora"},
    "fedelta fedavg+naive+median": {"strategy.aggregator": "median"},
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
    from fedelta.simulations.memory import PeakMemory

    overrides = RUNS[name]
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


def run(name: str, args: argparse.Namespace) -> dict[str, dict]:
    """Per number of clients: the median time and peak memory of ``args.repeats`` fresh
    processes."""
    cells = {}
    for clients in CLIENTS:
        samples = [harness.fresh_process(measure, name, clients) for _ in range(args.repeats)]
        cells[str(clients)] = {
            key: statistics.median_high(s[key] for s in samples) for key in ("seconds", "peak-mb")
        }
        print(name, clients, cells[str(clients)], flush=True)
    return cells


def table(results: dict, args: argparse.Namespace) -> str:
    """Seconds and peak MB per aggregation path and number of clients."""
    rows = []
    for name, by_clients in results.items():
        cells = [by_clients[str(n)] for n in CLIENTS]  # JSON keys are strings
        growth = cells[-1]["peak-mb"] / max(cells[0]["peak-mb"], 1.0)
        parts = [f"{c['seconds']:.3f} / {c['peak-mb']:.1f}" for c in cells]
        rows.append([name, *parts, f"{growth:.1f}x"])
    header = ["aggregation", *(f"{n} clients: s / peak MB" for n in CLIENTS), "memory 100/10"]
    return "\n".join(
        [
            f"One round, median of {args.repeats} fresh processes per cell (2 CPU cores):",
            "",
            harness.markdown_table(header, rows, align="l" + "r" * (len(CLIENTS) + 1)),
        ]
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--repeats", type=int, default=3, help="fresh processes per cell (default: %(default)s)"
    )


if __name__ == "__main__":
    harness.main("server_aggregation", __doc__, RUNS, run, table, add_arguments=add_arguments)
