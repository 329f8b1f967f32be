"""Naive vs exact LoRA aggregation with heterogeneous client ranks on the default task.

Four clients with LoRA ranks 2, 4, 8 and 16 (global rank 16) fine-tune MiniLM on
Rotten Tomatoes (Dirichlet 0.5 label skew); every LoRA rule runs the same rounds
from the same seed. Writes a Markdown table of test accuracy per round and bytes
per round to ``benchmarks/results/lora_ranks.md`` (and the raw rows as JSON).

    python benchmarks/lora_ranks.py [--rounds 4] [--rules naive,ffa,fedex,flora]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fedelta.config import RunConfig  # noqa: E402
from fedelta.simulations import simulate  # noqa: E402

RESULTS = Path(__file__).parent / "results"
VARIANTS = {
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--rules", default=",".join(VARIANTS))
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.rules.split(","):
            flat = base_config(args.rounds, Path(tmp) / name) | VARIANTS[name]
            result = simulate(RunConfig.from_flat(flat), progress=False)
            runs[name] = result.rows
            print(name, [r.get("test-accuracy") for r in result.rows], flush=True)
    (RESULTS / "lora_ranks.json").write_text(json.dumps(runs, indent=1) + "\n")
    (RESULTS / "lora_ranks.md").write_text(format_table(runs, args.rounds) + "\n")
    print(format_table(runs, args.rounds))


def format_table(runs: dict[str, list[dict]], rounds: int) -> str:
    header = ["rule", *(f"acc r{i}" for i in range(rounds + 1))]
    header += ["MB up / round", "MB down / round", "rank-proj. error", "fold error"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, rows in runs.items():
        trained = [r for r in rows if r["round"] > 0]
        cells = [name] + [f"{r['test-accuracy']:.3f}" for r in rows]
        cells.append(f"{sum(r['bytes-up'] for r in trained) / len(trained) / 1e6:.2f}")
        cells.append(f"{sum(r['bytes-down'] for r in trained) / len(trained) / 1e6:.2f}")
        for key in ("rank-projection-error", "fold-error"):
            values = [r[key] for r in trained if key in r]
            cells.append(f"{sum(values) / len(values):.3f}" if values else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
