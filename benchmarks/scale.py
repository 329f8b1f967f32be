"""Simulation scale on one machine: 100 virtual clients, 10 sampled per round.

A Flower simulation (Ray) of the default task with 100 SuperNodes, each a
Dirichlet(1.0) partition of Rotten Tomatoes, 10 sampled for training and 10 for
federated evaluation per round, against the same work with only 10 SuperNodes.
Each Ray worker builds the model once and serves every client it is given; a
client's partition is loaded the first time it is sampled. The table reports the
time of the first round (which also asks every node for its site once), the mean
of the later rounds, and the peak resident memory of the whole simulation (this
process plus Ray's workers). Each case runs in a fresh process.

    python benchmarks/scale.py                 # writes results/scale.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
CASES = {
    "100 clients, 10 sampled": {"simulation.num-supernodes": 100, "fraction-train": 0.1},
    "10 clients, all sampled": {"simulation.num-supernodes": 10, "fraction-train": 1.0},
}
ALPHA = 1.0
"""Dirichlet(0.5) cannot give each of 100 sites 10 examples of this corpus; 1.0 can."""


def measure(name: str, rounds: int, steps: int) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from fedelta.config import RunConfig
    from fedelta.simulations import simulate

    with tempfile.TemporaryDirectory() as out:
        config = RunConfig().replace(
            **CASES[name],
            **{
                "num-server-rounds": rounds,
                "local-steps": steps,
                "fraction-evaluate": CASES[name]["fraction-train"],
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


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        print(json.dumps(measure(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=10)
    args = parser.parse_args()
    results = {}
    for name in CASES:
        out = subprocess.run(
            [sys.executable, __file__, "--child", name, str(args.rounds), str(args.local_steps)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        results[name] = json.loads(out.strip().splitlines()[-1])
        print(name, results[name], flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scale.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        f"Default task (MiniLM LoRA r=8), Dirichlet({ALPHA:g}) sites, {args.rounds} rounds x "
        f"{args.local_steps} local steps, batch 16, 2 CPU cores, one Ray worker (client-cpus 2):",
        "",
        "| simulation | trained per round | first round s | later rounds s (mean) | "
        "peak RSS MB (all processes) | total s | final acc |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        first, *later = r["round-seconds"]
        lines.append(
            f"| {name} | {min(r['replied'])}-{max(r['replied'])} | {first:.1f} | "
            f"{statistics.fmean(later):.1f} | {r['peak-rss-mb']:.0f} | "
            f"{r['wall-seconds']:.0f} | {r['final-test-accuracy']:.3f} |"
        )
    (RESULTS / "scale.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
