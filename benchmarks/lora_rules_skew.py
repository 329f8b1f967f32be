"""Naive vs exact LoRA aggregation when clients agree (IID) and when they do not.

A programmatic strategy experiment: no Flower processes, the same ClientTrainer
and strategies the federation uses, driven in one loop. Four clients with LoRA
r=8 train 25 steps per round on IID or Dirichlet(0.5) label-skewed partitions of
Rotten Tomatoes; each rule aggregates two rounds; central test accuracy and loss
after each round. Writes ``benchmarks/results/lora_rules_skew.md``.

    python benchmarks/lora_rules_skew.py
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fedelta.config import RunConfig  # noqa: E402
from fedelta.simulations.in_process import federate  # noqa: E402

RESULTS = Path(__file__).parent / "results"
CLIENTS, ROUNDS = 4, 2
RULES = ("naive", "ffa", "fedex")


def run(partitioner: str, rule: str) -> list[tuple[float, float]]:
    """(accuracy, loss) after each round."""
    config = RunConfig().replace(
        **{
            "data.partitioner": partitioner,
            "simulation.num-supernodes": CLIENTS,
            "strategy.lora": rule,
            "num-server-rounds": ROUNDS,
        }
    )
    done = federate(config, on_round=lambda row: print(partitioner, rule, row, flush=True))
    curve = [(r["test-accuracy"], r["test-loss"]) for r in done.rows[1:]]
    return curve


def main() -> None:
    header = "| partition | rule | " + " | ".join(
        f"acc r{r} | loss r{r}" for r in range(1, ROUNDS + 1)
    )
    lines = [header + " |", "|---|---|" + "---|---|" * ROUNDS]
    for partitioner in ("iid", "dirichlet"):
        for rule in RULES:
            cells = [f"{acc:.3f} | {loss:.3f}" for acc, loss in run(partitioner, rule)]
            lines.append(f"| {partitioner} | {rule} | " + " | ".join(cells) + " |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lora_rules_skew.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
