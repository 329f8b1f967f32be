"""Naive vs exact LoRA aggregation when clients agree (IID) and when they do not.

A programmatic strategy experiment: no Flower processes, the same ClientTrainer
and strategies the federation uses, driven in one loop. Four clients with LoRA
r=8 train 25 steps per round on IID or Dirichlet(0.5) label-skewed partitions of
Rotten Tomatoes; each rule aggregates two rounds; central test accuracy and loss
after each round. Each entry is ``PARTITION/RULE``; writes
``benchmarks/results/lora_rules_skew.{json,md}``.

    python benchmarks/lora_rules_skew.py [--only 'dirichlet/*']
"""

from __future__ import annotations

import argparse
import os

import harness

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fedelta.config import RunConfig  # noqa: E402
from fedelta.simulations.in_process import federate  # noqa: E402

CLIENTS, ROUNDS = 4, 2
RULES = ("naive", "ffa", "fedex")
RUNS = [f"{partitioner}/{rule}" for partitioner in ("iid", "dirichlet") for rule in RULES]


def run(name: str, args: argparse.Namespace) -> list[dict]:
    """Central test accuracy and loss after each round, round 0 (before training) first."""
    partitioner, rule = name.split("/")
    config = RunConfig().replace(
        **{
            "data.partitioner": partitioner,
            "simulation.num-supernodes": CLIENTS,
            "strategy.lora": rule,
            "num-server-rounds": ROUNDS,
        }
    )
    done = federate(config, on_round=lambda row: print(partitioner, rule, row, flush=True))
    return [
        {"round": r["round"], "accuracy": r["test-accuracy"], "loss": r["test-loss"]}
        for r in done.rows
    ]


def table(results: dict[str, list[dict]], args: argparse.Namespace) -> str:
    """Accuracy and loss after each trained round, per partition and rule."""
    header = ["partition", "rule"]
    for r in range(1, ROUNDS + 1):
        header += [f"acc r{r}", f"loss r{r}"]
    rows = []
    for name, rounds in results.items():
        cells = name.split("/")
        for r in rounds[1:]:
            cells += [f"{r['accuracy']:.3f}", f"{r['loss']:.3f}"]
        rows.append(cells)
    return harness.markdown_table(header, rows)


if __name__ == "__main__":
    harness.main("lora_rules_skew", __doc__, RUNS, run, table)
