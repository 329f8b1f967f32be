"""Server optimizers on the default federation (8 sites, Dirichlet 0.5 label skew).

FedAvg's test accuracy swings between rounds on this task (label skew pulls the
head towards whichever labels the round's clients hold). Each variant runs the
default config (5 rounds, all 8 clients, 25 local steps at lr 2e-3, seed 42) with
another server optimizer; writes ``benchmarks/results/server_optimizers.md``.

    python benchmarks/server_optimizers.py [--only fedavg,fedavgm,fedadam]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import harness

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fedelta.config import load_config  # noqa: E402
from fedelta.simulations import simulate  # noqa: E402

ROOT = Path(__file__).parents[1]
RUNS = {
    "fedavg": {},
    "fedavgm": {"strategy.optimizer": "fedavgm"},
    "fedavgm-lr0.1": {"strategy.optimizer": "fedavgm", "strategy.server-lr": 0.1},
    "fedadam": {"strategy.optimizer": "fedadam"},
    "fedadam-lr0.1": {"strategy.optimizer": "fedadam", "strategy.server-lr": 0.1},
    "fedyogi": {"strategy.optimizer": "fedyogi"},
}
"""Variant name to config overrides (unset server-lr: the optimizer's default)."""


def run(name: str, args: argparse.Namespace) -> list[dict]:
    """The metrics rows (round 0 first) of the default federation with ``name``'s optimizer."""
    overrides = [f"{k}={v}" for k, v in RUNS[name].items()]
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(ROOT / "examples" / "default.toml", overrides)
        rows = simulate(config.replace(**{"output-dir": f"{tmp}/{name}"}), progress=False).rows
    print(name, [r.get("test-accuracy") for r in rows], flush=True)
    return rows


def table(results: dict[str, list[dict]], args: argparse.Namespace) -> str:
    """Test accuracy after each round per variant."""
    rounds = max(len(rows) for rows in results.values())
    body = []
    for name, rows in results.items():
        label = ", ".join(f"{k}={v}" for k, v in RUNS[name].items()) or "defaults"
        body.append([f"{name} ({label})", *(f"{r['test-accuracy']:.3f}" for r in rows)])
    return harness.markdown_table(["variant", *(f"acc r{i}" for i in range(rounds))], body)


if __name__ == "__main__":
    harness.main("server_optimizers", __doc__, RUNS, run, table, indent=1)
