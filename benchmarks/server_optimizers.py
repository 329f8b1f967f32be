"""Server optimizers on the default federation (8 sites, Dirichlet 0.5 label skew).

FedAvg's test accuracy swings between rounds on this task (label skew pulls the
head towards whichever labels the round's clients hold). Each variant runs the
default config (5 rounds, all 8 clients, 25 local steps at lr 2e-3, seed 42) with
another server optimizer; writes ``benchmarks/results/server_optimizers.md``.

    python benchmarks/server_optimizers.py [--variants fedavg,fedavgm,fedadam]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fedelta.config import load_config  # noqa: E402
from fedelta.simulations import simulate  # noqa: E402

ROOT = Path(__file__).parents[1]
RESULTS = Path(__file__).parent / "results"
VARIANTS = {
    "fedavg": {},
    "fedavgm": {"strategy.name": "fedavgm"},
    "fedavgm-lr0.1": {"strategy.name": "fedavgm", "strategy.server-lr": 0.1},
    "fedadam": {"strategy.name": "fedadam"},
    "fedadam-lr0.1": {"strategy.name": "fedadam", "strategy.server-lr": 0.1},
    "fedyogi": {"strategy.name": "fedyogi"},
}
"""Variant name to config overrides (unset server-lr: the optimizer's default)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    args = parser.parse_args()
    names = args.variants.split(",")
    unknown = set(names) - VARIANTS.keys()
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(names):
            overrides = [f"{k}={v}" for k, v in VARIANTS[name].items()]
            config = load_config(ROOT / "examples" / "default.toml", overrides)
            config = config.replace(**{"output-dir": str(Path(tmp) / str(i))})
            runs[name] = simulate(config, progress=False).rows
            print(name, [r.get("test-accuracy") for r in runs[name]], flush=True)
    # Rerunning some variants updates them in the saved results and keeps the others.
    RESULTS.mkdir(exist_ok=True)
    saved = RESULTS / "server_optimizers.json"
    runs = (json.loads(saved.read_text()) if saved.exists() else {}) | runs
    runs = {name: runs[name] for name in VARIANTS if name in runs}
    saved.write_text(json.dumps(runs, indent=1) + "\n")
    rounds = max(len(rows) for rows in runs.values())
    lines = [
        "| variant | " + " | ".join(f"acc r{i}" for i in range(rounds)) + " |",
        "|---|" + "---|" * rounds,
    ]
    for name, rows in runs.items():
        label = ", ".join(f"{k}={v}" for k, v in VARIANTS[name].items()) or "defaults"
        lines.append(
            f"| {name} ({label}) | " + " | ".join(f"{r['test-accuracy']:.3f}" for r in rows) + " |"
        )
    (RESULTS / "server_optimizers.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
