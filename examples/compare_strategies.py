"""Compare aggregation strategies on the default task from Python.

The default recipe (FedAvgM), plain FedAvg, FedAdam (server-side Adam), SCAFFOLD,
FedNova, FFA-LoRA (A frozen, only B averaged: exact) and top-5% sparse int8 uploads,
each over three seeds, on the default federation and its local-training recipe
(MiniLM-L6 LoRA r=8, 8 label-skewed Rotten Tomatoes sites, 5 rounds of at most 25
steps). Writes a comparison table (CSV, markdown), plots and ``report.html``:

    python examples/compare_strategies.py                      # outputs/compare-strategies
    python examples/compare_strategies.py --set num-server-rounds=2 --out /tmp/quick

Run it again with the same ``--out`` to resume: finished runs are not re-run; run it in a
second shell at the same time and the two split the runs. Each run trains in one process
(``--engine in-process``, no Ray); ``--engine simulation`` runs it on Flower.
The same experiment as a file for the CLI:
``fedelta experiment examples/experiments/compare-strategies.toml``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedelta.config import load_config
from fedelta.simulations import Experiment, run_experiment

DEFAULT_CONFIG = Path(__file__).with_name("default.toml")
ENGINE = "in-process"
BASE = ["strategy.head=joint"]
"""Every arm trains the head jointly from a random start, so the arms differ only in
what their names say (the default's FedNCM start is compared in head-strategies.toml)."""

VARIANTS = {
    "default": {},
    "fedavg": {"strategy.optimizer": "fedavg"},
    "fedadam": {"strategy.optimizer": "fedadam"},  # server Adam, server-lr 0.01
    "scaffold": {"strategy.optimizer": "scaffold"},
    "fednova": {"strategy.optimizer": "fednova"},
    "ffa-lora": {"strategy.lora": "ffa"},
    "top5-int8": {
        "compression.sparsity": "top-k",
        "compression.density": 0.05,
        "compression.quantization": "int8",
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/compare-strategies"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 0, 1])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument(
        "--engine",
        choices=["in-process", "simulation"],
        default=ENGINE,
        help="in-process: the same rounds without Ray (default); simulation: on Flower",
    )
    args = parser.parse_args()

    experiment = Experiment(
        name="compare-strategies",
        base=load_config(DEFAULT_CONFIG, [*BASE, *args.overrides]),
        variants=VARIANTS,
        seeds=args.seeds,
        engine=args.engine,
    )
    done = run_experiment(experiment, args.out)
    print(done.table)
    print(f"report: {done.report}")


if __name__ == "__main__":
    main()
