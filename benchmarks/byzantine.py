"""Byzantine clients against the aggregators of the strategy library.

5 sites with IID shares of Rotten Tomatoes, all sampled every round; one of them
(20%) is Byzantine and replaces its honest delta with one of four attacks:

- ``sign-flip``: the negated delta;
- ``scale-100``: the delta times 100;
- ``nan``: NaN everywhere (the server's validation rejects it before aggregation);
- ``random``: i.i.d. N(0, 1) entries (an honest delta's total L2 norm is a few units).

Each attack (and ``none``) is run against FedAvg (mean), coordinate-wise median,
trimmed mean (20% each side), Krum (f = 1) and norm bounding (clip-norm 5, about
an honest update's norm) on real Flower simulations: 4 rounds of 15 local steps,
MiniLM LoRA r=8, sequences of 32 tokens, 500 held-out test sentences. A NaN
update is rejected by the server's validation before any rule sees it, so that
attack is run once, with FedAvg. Each entry is ``ATTACK/RULE``; writes
``benchmarks/results/byzantine.md`` and ``.json``.

    python benchmarks/byzantine.py [--only 'sign-flip/*,*/median'] [--redo]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import harness
import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from flwr.app import Array  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from fedelta import protocol  # noqa: E402
from fedelta.client import app as fedelta_client  # noqa: E402
from fedelta.config import RunConfig  # noqa: E402
from fedelta.simulations import simulate  # noqa: E402

NUM_SITES = 5
BYZANTINE = frozenset({0})
"""Partition ids of the attackers: 20% of the sites."""
ATTACKS = ("none", "sign-flip", "scale-100", "nan", "random")
RULES = {
    "mean": {},
    "median": {"strategy.aggregator": "median"},
    "trimmed-mean": {"strategy.aggregator": "trimmed-mean", "strategy.trim-fraction": 0.2},
    "krum": {"strategy.aggregator": "krum", "strategy.byzantine": 1},
    "norm-bound": {"strategy.clip-norm": 5.0},
}
RULE_AGNOSTIC = frozenset({"nan"})
"""Attacks the server's validation stops before aggregation: run with FedAvg only."""
RUNS = [f"{a}/{r}" for a in ATTACKS for r in RULES if a not in RULE_AGNOSTIC or r == "mean"]
BASE = {
    "num-server-rounds": 4,
    "local-steps": 15,
    "model.max-length": 32,
    "fraction-evaluate": 0.0,
    "data.partitioner": "iid",
    "data.test-size": 500,
    "simulation.num-supernodes": NUM_SITES,
    "simulation.client-cpus": 1.0,
    "min-train-nodes": NUM_SITES,
    "min-available-nodes": NUM_SITES,
}


def corrupt(values: np.ndarray, attack: str, rng: np.random.Generator) -> np.ndarray:
    """What a Byzantine site sends instead of ``values``."""
    if attack == "sign-flip":
        return -values
    if attack == "scale-100":
        return values * 100.0
    if attack == "nan":
        return np.full_like(values, np.nan)
    if attack == "random":
        return rng.standard_normal(values.shape).astype(values.dtype)
    raise ValueError(f"unknown attack {attack!r}")


def attacking_app(attack: str) -> ClientApp:
    """fedelta's ClientApp, except that the Byzantine sites corrupt their delta."""

    def train(msg, context):
        reply = fedelta_client.train(msg, context)
        partition = int(context.node_config[protocol.PARTITION_ID])
        if attack != "none" and partition in BYZANTINE and not reply.has_error():
            _, server_round = protocol.read_config(msg.content)
            rng = np.random.default_rng([server_round, partition])
            record = reply.content.array_records[protocol.DELTA]
            for name in list(record.keys()):
                record[name] = Array(corrupt(record[name].numpy(), attack, rng))
        return reply

    return fedelta_client.with_train(train)


def run(name: str, args: argparse.Namespace) -> dict:
    """One real Flower simulation of ``ATTACK/RULE``."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    attack, rule = name.split("/")
    with tempfile.TemporaryDirectory() as tmp:
        config = RunConfig().replace(
            **BASE, **RULES[rule], **{"output-dir": f"{tmp}/{attack}-{rule}"}
        )
        result = simulate(config, client_app=attacking_app(attack), progress=False)
    return {
        "accuracy": [r.get("test-accuracy") for r in result.rows],
        "rejected": result.summary["total-rejected"],
        "clipped": sum(r.get("clients-clipped", 0) for r in result.rows),
        "wall-seconds": result.summary["wall-seconds"],
    }


def table(results: dict, args: argparse.Namespace) -> str:
    """Final test accuracy per attack (rows) and rule (columns)."""
    rows = []
    for attack in ATTACKS:
        cells = [attack]
        for rule in RULES:
            result = results.get(f"{attack}/{'mean' if attack in RULE_AGNOSTIC else rule}")
            if result is None:
                cells.append("-")
                continue
            cell = f"{result['accuracy'][-1]:.3f}"
            if result["rejected"]:
                cell += f" ({result['rejected']} rejected)"
            cells.append(cell)
        rows.append(cells)
    lines = [
        "# Byzantine clients: final test accuracy after 4 rounds",
        "",
        f"{NUM_SITES} IID sites, 1 Byzantine (20%), all sampled each round; MiniLM LoRA r=8,",
        "15 local steps per round, 500 test sentences. Regenerate: "
        "`python benchmarks/byzantine.py`.",
        "`(k rejected)`: updates the server's validation refused over the run; a NaN update",
        "never reaches a rule, so that attack is the same for all of them (run with mean).",
        "",
        harness.markdown_table(["attack", *RULES], rows, spaced_rule=True),
    ]
    start = next(iter(results.values()))["accuracy"][0] if results else None
    if start is not None:
        lines += ["", f"Round 0 (before training): {start:.3f}."]
    return "\n".join(lines)


if __name__ == "__main__":
    harness.main("byzantine", __doc__, RUNS, run, table, indent=1)
