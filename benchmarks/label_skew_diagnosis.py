"""What makes FedAvg swing under the default task's label skew: the head or the LoRA factors.

Runs the default task as it was before its recipe was re-chosen
(``examples/default.toml`` with ``convergence.OLD_DEFAULT``: 8 sites, Dirichlet(0.5)
label skew, 5 rounds x 25 AdamW steps at lr 2e-3, MiniLM LoRA r=8 + a fresh head on
the ``[CLS]`` pooler) in one process
(:func:`fedelta.simulations.in_process.federate`, the same round and client code as a
Flower run) and records, per round:

* the central test accuracy of the new global model, and of two swaps that tell
  which part moved it: the new LoRA factors with the previous round's head, and
  the previous factors with the new head;
* the head's logit gap (bias of class 1 minus class 0) and its change;
* per site: its share of class-1 examples, its passes over its data in one round
  (25 steps x batch 16 over its training examples), the L2 norm of its update's
  head and LoRA parts, and their cosine to the example-weighted mean update.

Each entry is one seed of the default task; the table is the per-round summary.

    python benchmarks/label_skew_diagnosis.py [--only seed-42,seed-0]

Writes ``benchmarks/results/label_skew_diagnosis.{json,md}``.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import harness
import numpy as np
from convergence import OLD_DEFAULT

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fedelta import protocol  # noqa: E402
from fedelta.config import load_config  # noqa: E402
from fedelta.data import LABEL, load_client_data  # noqa: E402
from fedelta.simulations.in_process import federate  # noqa: E402
from fedelta.tensors import is_head  # noqa: E402

DEFAULT = Path(__file__).parent.parent / "examples" / "default.toml"
RUNS = {f"seed-{seed}": seed for seed in (42, 0, 1)}
"""Entry name to the run seed (partitions, initialisation and sampling all follow it)."""


def run(name: str, args: argparse.Namespace) -> dict:
    """One seed of the default task, with every site's upload kept for the diagnosis."""
    overrides = {**OLD_DEFAULT, "fraction-evaluate": 0.0, "seed": RUNS[name]}
    config = load_config(DEFAULT).replace(**overrides)
    uploads: dict[int, dict[str, np.ndarray]] = {}

    def keep(site: protocol.Site, server_round: int, reply):
        values = reply.array_records[protocol.DELTA]["values"].numpy()
        uploads.setdefault(server_round, {})[site.name] = values.astype(np.float64)
        return reply

    started = time.monotonic()
    done = federate(config, reply_transform=keep, on_round=lambda row: print(name, row))
    minutes = (time.monotonic() - started) / 60
    names = sorted(done.states[0])
    sizes = [math.prod(done.states[0][n].shape) for n in names]
    head = np.concatenate([np.full(s, is_head(n)) for n, s in zip(names, sizes, strict=True)])
    sites = {}
    for i in range(config.simulation.num_supernodes):
        train = load_client_data(config.data, config.seed, config.simulation.num_supernodes, i)
        labels = np.asarray(train.train[LABEL])
        sites[f"client-{i}"] = {
            "examples": len(labels),
            "class-1-share": float(labels.mean()),
            "passes-per-round": config.local_steps * config.batch_size / len(labels),
        }
    rounds = []
    for r in range(1, config.num_server_rounds + 1):
        previous, new = done.states[r - 1], done.states[r]
        old_head = {k: v for k, v in previous.items() if is_head(k)}
        new_head = {k: v for k, v in new.items() if is_head(k)}
        bias = next(k for k in new if is_head(k) and k.endswith("bias"))
        weights = np.array([sites[s]["examples"] for s in uploads[r]], dtype=np.float64)
        stacked = np.stack(list(uploads[r].values()))
        mean = (weights[:, None] * stacked).sum(0) / weights.sum()
        per_site = {}
        for site, update in uploads[r].items():
            per_site[site] = {
                part: {
                    "norm": float(np.linalg.norm(update[mask])),
                    "cosine": _cosine(update[mask], mean[mask]),
                }
                for part, mask in (("head", head), ("lora", ~head))
            }
        rounds.append(
            {
                "round": r,
                "accuracy": done.rows[r]["test-accuracy"],
                "accuracy-previous-head": done.evaluator(new | old_head).accuracy,
                "accuracy-previous-lora": done.evaluator(previous | new_head).accuracy,
                "logit-gap": float(new[bias][1] - new[bias][0]),
                "logit-gap-change": float(
                    (new[bias][1] - new[bias][0]) - (previous[bias][1] - previous[bias][0])
                ),
                "sites": per_site,
            }
        )
    return {
        "seed": RUNS[name],
        "initial-accuracy": done.rows[0]["test-accuracy"],
        "sites": sites,
        "rounds": rounds,
        "minutes": round(minutes, 1),
    }


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    denominator = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b) / denominator if denominator else 0.0


def table(results: dict, args: argparse.Namespace) -> str:
    """Per seed and round: accuracy and the two swaps, the head's logit gap, and the
    sites' mean norms and cosines to the mean update, head and LoRA apart."""
    header = [
        "seed",
        "round",
        "acc",
        "acc, previous head",
        "acc, previous LoRA",
        "logit gap (change)",
        "head norm",
        "head cos",
        "LoRA norm",
        "LoRA cos",
    ]
    rows = []
    for r in (r for result in results.values() for r in _with_seed(result)):
        sites = r["sites"].values()
        rows.append(
            [
                r["seed"],
                r["round"],
                f"{r['accuracy']:.3f}",
                f"{r['accuracy-previous-head']:.3f}",
                f"{r['accuracy-previous-lora']:.3f}",
                f"{r['logit-gap']:+.3f} ({r['logit-gap-change']:+.3f})",
                f"{np.mean([s['head']['norm'] for s in sites]):.3f}",
                f"{np.mean([s['head']['cosine'] for s in sites]):.2f}",
                f"{np.mean([s['lora']['norm'] for s in sites]):.3f}",
                f"{np.mean([s['lora']['cosine'] for s in sites]):.2f}",
            ]
        )
    site_rows = [
        [
            result["seed"],
            site,
            s["examples"],
            f"{s['class-1-share']:.2f}",
            f"{s['passes-per-round']:.1f}",
        ]
        for result in results.values()
        for site, s in result["sites"].items()
    ]
    return "\n\n".join(
        [
            harness.markdown_table(header, rows),
            "Sites (class-1 share of the test set: see the all-one-class accuracy):",
            harness.markdown_table(
                ["seed", "site", "train examples", "class-1 share", "passes per round"], site_rows
            ),
        ]
    )


def _with_seed(result: dict) -> list[dict]:
    return [{"seed": result["seed"], **r} for r in result["rounds"]]


if __name__ == "__main__":
    harness.main("label_skew_diagnosis", __doc__, RUNS, run, table)
