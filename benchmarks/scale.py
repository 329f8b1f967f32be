"""Simulation scale on one machine: 100 virtual clients, 10 sampled per round.

A Flower simulation (Ray) of the default task with 100 SuperNodes, each a
Dirichlet(1.0) partition of Rotten Tomatoes, 10 sampled for training and 10 for
federated evaluation per round, against the same work with only 10 SuperNodes.
Each Ray worker builds the model once and serves every client it is given; a
client's partition is loaded the first time it is sampled. The table reports the
time of the first round (which also asks every node for its site once), the mean
of the later rounds, and the peak resident memory of the whole simulation (this
process plus Ray's workers). Each case runs in a fresh process.

    python benchmarks/scale.py [--only '100*']  # writes results/scale.{json,md}
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

import harness

RUNS = {
    "100 clients, 10 sampled": {"simulation.num-supernodes": 100, "fraction-train": 0.1},
    "10 clients, all sampled": {"simulation.num-supernodes": 10, "fraction-train": 1.0},
}
ALPHA = 1.0
"""Dirichlet(0.5) cannot give each of 100 sites 10 examples of this corpus; 1.0 can."""


def measure(name: str, rounds: int, steps: int) -> dict:
    """In this process: the simulation of case ``name``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from fedelta.config import RunConfig
    from fedelta.simulations import simulate

    with tempfile.TemporaryDirectory() as out:
        config = RunConfig().replace(
            **RUNS[name],
            **{
                "num-server-rounds": rounds,
                "local-steps": steps,
                "fraction-evaluate": RUNS[name]["fraction-train"],
                "data.dirichlet-alpha": ALPHA,
                "output-dir": out,
            },
        )
        result = simulate(config, progress=False, report=False)
    trained = result.rows[1:]
    return {
        "sampled": [r["clients-sampled"] for r in trained],
        "replied": [r["clients-replied"] for r in trained],
        "round-seconds": [r["wall-seconds"] for r in trained],
        "peak-rss-mb": result.summary["peak-rss-mb"],
        "wall-seconds": result.summary["wall-seconds"],
        "final-test-accuracy": result.summary["final-test-accuracy"],
    }


def run(name: str, args: argparse.Namespace) -> dict:
    """Case ``name`` in a fresh process."""
    return harness.fresh_process(measure, name, args.rounds, args.local_steps)


def table(results: dict, args: argparse.Namespace) -> str:
    """Round times, peak memory and final accuracy per case."""
    rows = []
    for name, r in results.items():
        first, *later = r["round-seconds"]
        rows.append(
            [
                name,
                f"{min(r['replied'])}-{max(r['replied'])}",
                f"{first:.1f}",
                f"{statistics.fmean(later):.1f}",
                f"{r['peak-rss-mb']:.0f}",
                f"{r['wall-seconds']:.0f}",
                f"{r['final-test-accuracy']:.3f}",
            ]
        )
    header = ["simulation", "trained per round", "first round s", "later rounds s (mean)"]
    header += ["peak RSS MB (all processes)", "total s", "final acc"]
    return "\n".join(
        [
            f"Default task (MiniLM LoRA r=8), Dirichlet({ALPHA:g}) sites, {args.rounds} rounds x "
            f"{args.local_steps} local steps, batch 16, 2 CPU cores, one Ray worker "
            "(client-cpus 2):",
            "",
            harness.markdown_table(header, rows, align="lrrrrrr"),
        ]
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--rounds", type=int, default=4, help="server rounds per case (default: %(default)s)"
    )
    parser.add_argument(
        "--local-steps", type=int, default=10, help="local steps per round (default: %(default)s)"
    )


if __name__ == "__main__":
    harness.main("scale", __doc__, RUNS, run, table, add_arguments=add_arguments)
