"""Naive vs exact LoRA aggregation with heterogeneous client ranks on the default task.

Four clients with LoRA ranks 2, 4, 8 and 16 (global rank 16) fine-tune MiniLM on
Rotten Tomatoes (Dirichlet 0.5 label skew); every LoRA rule runs the same rounds
from the same seed. Writes a Markdown table of test accuracy per round and bytes
per round to ``benchmarks/results/lora_ranks.md`` (and the raw rows as JSON).

    python benchmarks/lora_ranks.py [--rounds 4] [--only naive,ffa,fedex,flora]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import harness

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fedelta.config import RunConfig  # noqa: E402
from fedelta.simulations import simulate  # noqa: E402

RUNS = {
    "naive": {"strategy.lora": "naive"},
    "ffa": {"strategy.lora": "ffa"},
    "fedex": {"strategy.lora": "fedex"},
    "fedex-svd16": {"strategy.lora": "fedex", "strategy.fold-rank": 16},
    "flora": {"strategy.lora": "flora"},
    "flora-svd16": {"strategy.lora": "flora", "strategy.fold-rank": 16},
}


def base_config(rounds: int, out: Path) -> dict:
    return {
        "num-server-rounds": rounds,
        "fraction-evaluate": 0.0,
        "min-train-nodes": 4,
        "min-available-nodes": 4,
        "lora.r": 16,
        "lora.client-ranks": "2,4,8,16",
        "simulation.num-supernodes": 4,
        "simulation.client-cpus": 2.0,
        "output-dir": str(out),
    }


def run(name: str, args: argparse.Namespace) -> list[dict]:
    """The metrics rows (round 0 first) of a Flower simulation with rule ``name``."""
    with tempfile.TemporaryDirectory() as tmp:
        flat = base_config(args.rounds, Path(tmp) / name) | RUNS[name]
        rows = simulate(RunConfig.from_flat(flat), progress=False).rows
    print(name, [r.get("test-accuracy") for r in rows], flush=True)
    return rows


def table(results: dict[str, list[dict]], args: argparse.Namespace) -> str:
    """Accuracy per round, mean bytes per round, mean projection and fold errors."""
    rounds = max(len(rows) for rows in results.values()) - 1
    header = ["rule", *(f"acc r{i}" for i in range(rounds + 1))]
    header += ["MB up / round", "MB down / round", "rank-proj. error", "fold error"]
    body = []
    for name, rows in results.items():
        trained = [r for r in rows if r["round"] > 0]
        cells = [name] + [f"{r['test-accuracy']:.3f}" for r in rows]
        cells.append(f"{sum(r['bytes-up'] for r in trained) / len(trained) / 1e6:.2f}")
        cells.append(f"{sum(r['bytes-down'] for r in trained) / len(trained) / 1e6:.2f}")
        for key in ("rank-projection-error", "fold-error"):
            values = [r[key] for r in trained if key in r]
            cells.append(f"{sum(values) / len(values):.3f}" if values else "-")
        body.append(cells)
    return harness.markdown_table(header, body)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--rounds", type=int, default=4, help="server rounds per entry (default: %(default)s)"
    )


if __name__ == "__main__":
    harness.main("lora_ranks", __doc__, RUNS, run, table, add_arguments=add_arguments, indent=1)
