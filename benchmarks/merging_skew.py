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
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fedelta.config import ExportConfig, load_config  # noqa: E402
from fedelta.merging.layers import scheme_for  # noqa: E402
from fedelta.merging.rounds import merge_rounds  # noqa: E402
from fedelta.simulations.in_process import federate  # noqa: E402

RESULTS = Path(__file__).parent / "results"
DEFAULT = Path(__file__).parent.parent / "examples" / "default.toml"

RUNS = {
    "fedavg": {},
    "ties": {"strategy.robust": "ties", "strategy.merge-density": 0.2},
    "dare-ties": {"strategy.robust": "dare-ties", "strategy.merge-density": 0.5},
    "magnitude-prune": {"strategy.robust": "magnitude-prune", "strategy.merge-density": 0.2},
    "ties-on-products": {
        "strategy.robust": "ties",
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


def run(name: str) -> dict:
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


def table(results: dict) -> str:
    rounds = len(next(iter(results.values()))["rounds"]) - 1
    head = "| aggregation | " + " | ".join(f"r{r}" for r in range(1, rounds + 1))
    lines = [head + " | best | final loss |", "|---" * (rounds + 3) + "|"]
    for name, r in results.items():
        accs = [row["accuracy"] for row in r["rounds"][1:]]
        cells = " | ".join(f"{a:.3f}" for a in accs)
        lines.append(f"| {name} | {cells} | {max(accs):.3f} | {r['rounds'][-1]['loss']:.3f} |")
    lines += [
        "",
        "| aggregation | " + " | ".join(EXPORTS) + " |",
        "|---" * (len(EXPORTS) + 1) + "|",
    ]
    for name, r in results.items():
        cells = " | ".join(f"{r['exports'][e]['accuracy']:.3f}" for e in EXPORTS)
        lines.append(f"| {name} | {cells} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated run names (default: all)")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(RUNS)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "merging_skew.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    for name in names:
        results[name] = run(name)
        path.write_text(json.dumps(results, indent=2) + "\n")
    ordered = {n: results[n] for n in RUNS if n in results}
    (RESULTS / "merging_skew.md").write_text(table(ordered))
    print(table(ordered))


if __name__ == "__main__":
    main()
