"""Server memory while aggregating one round: 5 vs 50 clients, MiniLM-sized adapters.

Each measurement runs in a fresh process: it builds the global state of the
default model (MiniLM-L6, LoRA r=8 on query/key/value/dense, plus head), then
folds ``n`` client deltas into the strategy one at a time, as the server does
when replies arrive, and reports the peak resident memory above the level
before the round. Streaming rules must stay flat in ``n``; buffered robust rules
grow linearly (stated in the capability matrix).

    python benchmarks/server_memory.py            # writes results/server_memory.md
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
CASES = [
    ("fedavg+naive", {}),
    ("fedadam+ffa", {"strategy.name": "fedadam", "strategy.lora": "ffa"}),
    ("fedavg+fedex", {"strategy.lora": "fedex"}),
    ("fedavg+flora", {"strategy.lora": "flora"}),
    ("fedavg+naive+median", {"strategy.robust": "median"}),
]


def measure(overrides: dict, clients: int) -> dict:
    """Run in this process: aggregate ``clients`` deltas, return peak RSS growth (MB)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import psutil
    import torch

    from fedelta.config import RunConfig
    from fedelta.lora import FOLD_PREFIX
    from fedelta.models import ModelSpec, cached_model
    from fedelta.strategies import build_strategy

    config = RunConfig().replace(**overrides)
    built = cached_model(ModelSpec.from_config(config, 2))
    strategy = build_strategy(config)
    global_state = strategy.initial_state(built.initial_state)
    layout = strategy.uplink_layout(
        {k: tuple(v.shape) for k, v in global_state.items() if not k.startswith(FOLD_PREFIX)}
    )
    process = psutil.Process()
    baseline = peak = process.memory_info().rss
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    gen = torch.Generator().manual_seed(0)
    strategy.begin_round(1, global_state, [config.lora.r] * clients)
    for _ in range(clients):
        delta = {k: torch.randn(shape, generator=gen) * 1e-3 for k, shape in layout.items()}
        strategy.accumulate(delta, 100)
        del delta
    strategy.finish_round(global_state)
    stop.set()
    sampler.join()
    return {"clients": clients, "peak-mb": (max(peak, process.memory_info().rss) - baseline) / 1e6}


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        overrides, clients = json.loads(sys.argv[2])
        print(json.dumps(measure(overrides, clients)))
        return
    rows = []
    for name, overrides in CASES:
        peaks = {}
        for clients in (5, 50):
            out = subprocess.run(
                [sys.executable, __file__, "--child", json.dumps([overrides, clients])],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            peaks[clients] = json.loads(out.strip().splitlines()[-1])["peak-mb"]
        rows.append((name, peaks[5], peaks[50], peaks[50] / max(peaks[5], 1e-9)))
        print(name, peaks, flush=True)
    lines = [
        "| strategy | peak MB, 5 clients | peak MB, 50 clients | ratio 50/5 |",
        "|---|---|---|---|",
    ]
    lines += [f"| {n} | {a:.1f} | {b:.1f} | {r:.2f} |" for n, a, b, r in rows]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "server_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
