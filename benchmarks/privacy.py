"""Accuracy against epsilon: sample-level DP-SGD and client-level DP on the default task.

The default task (MiniLM LoRA r=8 on query/key/value/dense, 8 clients with
Dirichlet(0.5) label skew, 5 rounds x 25 local steps, batch 16, lr 2e-3) run in one
process (:func:`fedelta.simulations.in_process.federate`: the trainer, the
strategy and the Opacus accounting of a real federation), with

* DP-SGD on every client, the noise chosen per site so that a site trained in all
  5 rounds ends at the target epsilon (delta 1e-5, clipping norm 1.0);
  (``dp-sgd-3-ffa``: with FFA-LoRA; ``dp-sgd-3-batch64``: batch 64, 10 local steps,
  lr 5e-3, for a less noisy mean gradient);
* client-level DP (central: the server clips each site's delta to 0.1 and noises
  the mean), the noise chosen so that 5 rounds with every site sampled end at
  the target epsilon (delta 1e-5).

Central test accuracy on the 1000 held-out sentences after every round; the
epsilon column is the largest any site spent (DP-SGD) or the server's
client-level epsilon. Noise is seeded (``privacy.seeded-noise``) so the table
repeats; one seed per row.

    python benchmarks/privacy.py [--only none,dp-sgd-3]

Runs in parallel processes append to the same results under a file lock. Writes
``benchmarks/results/privacy.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import harness

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fedelta.config import load_config  # noqa: E402
from fedelta.simulations.in_process import federate  # noqa: E402

DEFAULT = Path(__file__).parent.parent / "examples" / "default.toml"
SEEDED = {"privacy.seeded-noise": True}

RUNS: dict[str, dict] = {"none": {}}
# Both DP modes refuse the default's FedNCM head (the class feature sums are not
# noised); DP-SGD also refuses its calibrated loss (the site's label counts would enter
# every example's gradient unnoised) and its per-round warmup.
_JOINT = {"strategy.head": "joint"}
_DP_SGD = {**_JOINT, "privacy.dp-sgd": True, "loss": "cross-entropy", "warmup-steps": 0}
for _eps in (8, 3, 1):
    RUNS[f"dp-sgd-{_eps}"] = {**_DP_SGD, "privacy.target-epsilon": float(_eps)}
RUNS["dp-sgd-3-ffa"] = {**RUNS["dp-sgd-3"], "strategy.lora": "ffa"}
# DP-SGD's noise on the mean gradient shrinks with the batch: 4x the batch, 0.4x the steps.
RUNS["dp-sgd-3-batch64"] = {
    **RUNS["dp-sgd-3"],
    "batch-size": 64,
    "local-steps": 10,
    "lr": 5e-3,
}
for _eps in (8, 3, 1):
    RUNS[f"client-dp-{_eps}"] = {
        **_JOINT,
        "privacy.client-dp": "central",
        "privacy.client-target-epsilon": float(_eps),
    }
"""Name to config overrides of the default task."""


def run(name: str, args: argparse.Namespace) -> dict:
    """The federation of ``name``: accuracy, loss and epsilon after every round."""
    overrides = {**RUNS[name], **(SEEDED if RUNS[name] else {})}
    config = load_config(DEFAULT).replace(**{"fraction-evaluate": 0.0, **overrides})
    started = time.monotonic()
    done = federate(config, on_round=lambda row: print(name, row, flush=True))
    rows = [
        {
            "round": r["round"],
            "accuracy": r["test-accuracy"],
            "loss": r["test-loss"],
            "epsilon": r.get("dp-epsilon", r.get("client-dp-epsilon")),
            "noise-multiplier": r.get("client-dp-noise-multiplier"),
        }
        for r in done.rows
    ]
    return {
        "overrides": overrides,
        "rounds": rows,
        "minutes": round((time.monotonic() - started) / 60, 1),
    }


def table(results: dict, args: argparse.Namespace) -> str:
    """Epsilon spent, accuracy per round, best accuracy and final loss per run."""
    rounds = max(len(r["rounds"]) for r in results.values()) - 1
    rows = []
    for name, r in results.items():
        eps = r["rounds"][-1]["epsilon"]
        rows.append([name, "-" if eps is None else f"{eps:.2f}", *harness.curve_cells(r["rounds"])])
    header = ["run", "epsilon (delta 1e-5)", *harness.curve_header(rounds)]
    return harness.markdown_table(header, rows)


if __name__ == "__main__":
    harness.main("privacy", __doc__, RUNS, run, table)
