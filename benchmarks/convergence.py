"""Which local-training recipe makes the default task converge under label skew.

Every arm is the default task (``examples/default.toml``: 8 sites of Rotten Tomatoes,
Dirichlet(0.5) label skew, MiniLM LoRA r=8 + a fresh head, 5 rounds of at most 25
steps) with the earlier local-training recipe (:data:`BASE`) and some keys changed,
run in one process (:func:`fedelta.simulations.in_process.federate`: the same round
and client code as a Flower run, every site in every round) at seeds 42, 0 and 1.
The table gives, per arm, the final central test accuracy (mean ± std over the
seeds), the worst final, and the worst drop below the best round so far from round
3 on (the demo's stability bar is 2 points), then every seed's curve.

    python benchmarks/convergence.py [--only 'mean-pooling/*'] [--redo] [--report-only]

Writes ``benchmarks/results/convergence.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time
from pathlib import Path

import harness

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fedelta.config import load_config  # noqa: E402
from fedelta.simulations.in_process import federate  # noqa: E402

DEFAULT = Path(__file__).parent.parent / "examples" / "default.toml"
SEEDS = (42, 0, 1)
BASE: dict[str, object] = {
    "max-local-epochs": 0.0,
    "lr": 2e-3,
    "lr-scheduler": "constant",
    "warmup-steps": 0,
    "keep-optimizer-state": False,
    "loss": "cross-entropy",
    "strategy.optimizer": "fedavg",
    "strategy.momentum": 0.9,
    "strategy.head": "joint",
}
"""What every arm starts from: ``examples/default.toml`` with the local-training
recipe it had before this benchmark chose a new one (AdamW at lr 2e-3 afresh each
round, plain cross-entropy, FedAvg), but MiniLM's own mean pooling."""
OLD_DEFAULT = {**BASE, "model.pooling": "cls"}
"""The default task as it was: also ``[CLS]`` pooling through the untrained pooler."""
CALIBRATED: dict[str, object] = {
    "loss": "logit-adjusted",
    "lr": 1e-3,
    "lr-scheduler": "cosine",
    "max-local-epochs": 2.0,
}
"""The first arm that stopped the majority-class collapse; later arms build on it."""
KEPT_ADAM = {**CALIBRATED, "warmup-steps": 5, "keep-optimizer-state": True}
SERVER_MOMENTUM = {**KEPT_ADAM, "strategy.optimizer": "fedavgm", "strategy.momentum": 0.5}
ARMS: dict[str, dict[str, object]] = {
    "before": {"model.pooling": "cls"},
    "mean-pooling-lr5e-4": {"lr": 5e-4},
    "logit-adjusted-cosine": CALIBRATED,
    "warm-kept-adam": KEPT_ADAM,
    "ffa-warm-kept-adam": {**KEPT_ADAM, "lr": 2e-3, "strategy.lora": "ffa"},
    "kept-adam-lr2e-3": {**KEPT_ADAM, "lr": 2e-3},
    "kept-adam-server-momentum": SERVER_MOMENTUM,
    "server-momentum-six-rounds": {"num-server-rounds": 6, **SERVER_MOMENTUM},
    "ten-short-rounds": {
        "num-server-rounds": 10,
        "local-steps": 12,
        **KEPT_ADAM,
        "warmup-steps": 3,
    },
    "ncm-head": {**KEPT_ADAM, "strategy.head": "ncm"},
    "slow-body-fast-head": {**CALIBRATED, "lr": 5e-4, "head-lr": 5e-3, "warmup-steps": 5},
}
"""Arm name to the keys it changes in :data:`BASE` (``before`` is the default task as
it was; ``kept-adam-server-momentum`` is the recipe ``examples/default.toml`` has with a
jointly trained head, ``ncm-head`` with the default's FedNCM head but no server momentum)."""


def entries() -> list[str]:
    return [f"{arm}/seed-{seed}" for arm in ARMS for seed in SEEDS]


def run(name: str, args: argparse.Namespace) -> dict:
    """One seed of one arm, in this process."""
    arm, seed = name.rsplit("/seed-", 1)
    overrides = {**BASE, "fraction-evaluate": 0.0, "seed": int(seed), **ARMS[arm]}
    config = load_config(DEFAULT).replace(**overrides)
    started = time.monotonic()
    done = federate(config, on_round=lambda row: print(name, row, flush=True))
    return {
        "arm": arm,
        "seed": int(seed),
        "overrides": {k: v for k, v in ARMS[arm].items()},
        "rounds": [
            {"accuracy": row["test-accuracy"], "loss": row["test-loss"]} for row in done.rows
        ],
        "minutes": round((time.monotonic() - started) / 60, 2),
        "peak-rss-gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }


def worst_drop(accuracies: list[float], start: int = 3) -> float:
    """The largest fall below the best round so far, from round ``start`` on (rounds
    are 1-based; ``accuracies[0]`` is round 1)."""
    drops = [
        max(accuracies[: r - 1]) - accuracies[r - 1]
        for r in range(max(start, 2), len(accuracies) + 1)
    ]
    return max([0.0, *drops])


def _spread(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f} (1 seed)"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(results: dict, args: argparse.Namespace) -> str:
    by_arm: dict[str, list[dict]] = {}
    for result in results.values():
        by_arm.setdefault(result["arm"], []).append(result)
    summary = []
    for arm, runs in by_arm.items():
        finals = [r["rounds"][-1]["accuracy"] for r in runs]
        drops = [worst_drop([x["accuracy"] for x in r["rounds"][1:]]) for r in runs]
        summary.append(
            [
                arm,
                ", ".join(f"{k}={v}" for k, v in runs[0]["overrides"].items()) or "-",
                len(runs),
                _spread(finals),
                f"{min(finals):.3f}",
                f"{max(drops):.3f}",
                f"{statistics.mean(r['minutes'] for r in runs):.1f}",
            ]
        )
    header = [
        "arm",
        "changes",
        "seeds",
        "final (mean ± std)",
        "worst final",
        "worst drop r3+",
        "min/run",
    ]
    parts = [harness.markdown_table(header, summary, align="llrrrrr")]
    rounds = max(len(r["rounds"]) - 1 for r in results.values())
    curves = []
    for r in results.values():
        cells = harness.curve_cells(r["rounds"])
        padding = ["-"] * (rounds + 1 - len(r["rounds"]))  # shorter runs: empty rounds
        curves.append([r["arm"], r["seed"], *cells[:-2], *padding, *cells[-2:]])
    parts.append(harness.markdown_table(["arm", "seed", *harness.curve_header(rounds)], curves))
    return "\n\n".join(parts)


if __name__ == "__main__":
    harness.main("convergence", __doc__, entries(), run, table)
