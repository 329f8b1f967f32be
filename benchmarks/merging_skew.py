"""Merge operators as aggregation under strong label skew, and merges across rounds.

A programmatic strategy experiment on the default task (MiniLM LoRA r=8 on
query/key/value/dense, 8 clients, 5 rounds x 25 local steps, lr 2e-3) with the
labels split Dirichlet(0.1): most clients hold almost only one class. The same
ClientTrainer and strategies a federation uses run in one process
(:func:`fedelta.simulations.in_process.federate`); central test accuracy and
loss on the 1000 held-out sentences after every round. For every run, the
exported model is also computed with each merge across rounds (EMA, LiNeS, TIES
over the round deltas) and evaluated.

    python benchmarks/merging_skew.py [--only fedavg,ties]

Writes ``benchmarks/results/merging_skew.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import harness

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fedelta.config import ExportConfig, load_config  # noqa: E402
from fedelta.merging.layers import scheme_for  # noqa: E402
from fedelta.merging.rounds import merge_rounds  # noqa: E402
from fedelta.simulations.in_process import federate  # noqa: E402

DEFAULT = Path(__file__).parent.parent / "examples" / "default.toml"

RUNS = {
    "fedavg": {},
    "ties": {"strategy.aggregator": "ties", "strategy.merge-density": 0.2},
    "dare-ties": {"strategy.aggregator": "dare-ties", "strategy.merge-density": 0.5},
    "magnitude-prune": {"strategy.aggregator": "magnitude-prune", "strategy.merge-density": 0.2},
    "ties-on-products": {
        "strategy.aggregator": "ties",
        "strategy.merge-density": 0.2,
        "strategy.lora": "fedex",
    },
}
"""Name to config overrides of the default task (Dirichlet 0.1 in every run)."""

EXPORTS = {
    "last round": ExportConfig(),
    "ema 0.5": ExportConfig(merge="ema", ema_decay=0.5),
    "lines 0.5/0.5": ExportConfig(merge="lines", lines_alpha=0.5, lines_beta=0.5),
    "ties over rounds (0.2, x1)": ExportConfig(merge="ties", density=0.2, scale=1.0),
}


def run(name: str, args: argparse.Namespace) -> dict:
    """The federation of ``name`` and its export under each merge across rounds."""
    config = load_config(DEFAULT).replace(
        **{"data.dirichlet-alpha": 0.1, "fraction-evaluate": 0.0, **RUNS[name]}
    )
    started = time.monotonic()
    done = federate(config, on_round=lambda row: print(name, row, flush=True))
    rows = [
        {"round": r["round"], "accuracy": r["test-accuracy"], "loss": r["test-loss"]}
        for r in done.rows
    ]
    states, evaluator = done.states, done.evaluator
    model_config = evaluator.model.config
    scheme = scheme_for(model_config.model_type)
    exports = {}
    for label, export in EXPORTS.items():
        merged = merge_rounds(states, export, config.seed, scheme, model_config.num_hidden_layers)
        result = evaluator(merged)
        exports[label] = {"accuracy": result.accuracy, "loss": result.loss}
        print(name, label, exports[label], flush=True)
    return {
        "overrides": RUNS[name],
        "rounds": rows,
        "exports": exports,
        "minutes": round((time.monotonic() - started) / 60, 1),
    }


def table(results: dict, args: argparse.Namespace) -> str:
    """Accuracy per round, then the export under each merge across rounds."""
    rounds = max(len(r["rounds"]) for r in results.values()) - 1
    per_round = [[name, *harness.curve_cells(r["rounds"])] for name, r in results.items()]
    exports = [
        [name, *(f"{r['exports'][e]['accuracy']:.3f}" for e in EXPORTS)]
        for name, r in results.items()
    ]
    return "\n".join(
        [
            harness.markdown_table(["aggregation", *harness.curve_header(rounds)], per_round),
            "",
            harness.markdown_table(["aggregation", *EXPORTS], exports),
        ]
    )


if __name__ == "__main__":
    harness.main("merging_skew", __doc__, RUNS, run, table)
