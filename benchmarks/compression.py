"""Uplink compression on the default task: accuracy against bytes on the wire.

Runs ``examples/default.toml`` (8 label-skewed sites, 5 rounds of 25 local steps,
MiniLM, 1000 test sentences) with dense fp32 LoRA FedAvg and with sparse and
quantized uploads, each a real Flower simulation whose bytes are the ledger's
(serialized Flower messages). Federated evaluation is off in every run
(``fraction-evaluate = 0``), so bytes down are the training messages only.
Finished runs are kept in ``benchmarks/results/compression.json`` and skipped;
the table is ``benchmarks/results/compression.md``.

    python benchmarks/compression.py [--only dense,top-k-int8] [--redo]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import harness

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fedelta.config import load_config  # noqa: E402
from fedelta.server.metrics import format_bytes  # noqa: E402
from fedelta.simulations import simulate  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BASE = {"fraction-evaluate": 0.0}
FULL = {"model.finetuning": "full", "lr": 2e-4}
"""Sparse fine-tuning of the weights themselves (no adapter): a lower learning rate."""
RUNS: dict[str, tuple[str, dict]] = {
    "dense": ("dense fp32 LoRA (baseline)", {}),
    "top-k-int8": (
        "LoRA, top-k 5% + error feedback, int8 values",
        {"compression.sparsity": "top-k", "compression.quantization": "int8"},
    ),
    "top-k-int8-senders": (
        "LoRA, top-k 5% + error feedback, int8, mean over each entry's senders",
        {
            "compression.sparsity": "top-k",
            "compression.quantization": "int8",
            "compression.weighting": "senders",
        },
    ),
    "random-mask-int8": (
        "LoRA, seeded random mask 5% + error feedback, int8 (no indices)",
        {"compression.sparsity": "random-mask", "compression.quantization": "int8"},
    ),
    "full-spiel": (
        "full weights, SpIEL 3% (prune/regrow), fp32",
        {**FULL, "compression.sparsity": "spiel", "compression.density": 0.03},
    ),
    "int8-block": (
        "LoRA, dense, int8 per block of 256",
        {"compression.quantization": "int8-block"},
    ),
    "top-k-fp32": ("LoRA, top-k 5% + error feedback, fp32", {"compression.sparsity": "top-k"}),
    "hft": ("LoRA, Half Fine-Tuning, fp32", {"compression.half-finetuning": True}),
    "fp16": ("LoRA, dense, fp16", {"compression.quantization": "fp16"}),
    "spiel": ("LoRA factors, SpIEL 5%, fp32", {"compression.sparsity": "spiel"}),
    "lift": ("LoRA factors, LIFT 5%, fp32", {"compression.sparsity": "lift"}),
    "full-lift": (
        "full weights, LIFT 3% (rank 16), fp32",
        {**FULL, "compression.sparsity": "lift", "compression.density": 0.03},
    ),
    "top-k-1-int8": (
        "LoRA, top-k 1% + error feedback, int8",
        {
            "compression.sparsity": "top-k",
            "compression.density": 0.01,
            "compression.quantization": "int8",
        },
    ),
}


def run(name: str, args: argparse.Namespace) -> dict:
    """One real Flower simulation of the default task with ``name``'s uploads."""
    with tempfile.TemporaryDirectory() as tmp:
        overrides = {**BASE, **RUNS[name][1], "output-dir": f"{tmp}/{name}"}
        config = load_config(ROOT / "examples" / "default.toml").replace(**overrides)
        result = simulate(config, progress=False)
    return {
        "accuracy": [r.get("test-accuracy") for r in result.rows],
        "bytes-up": result.summary["total-bytes-up"],
        "bytes-down": result.summary["total-bytes-down"],
        "wall-seconds": result.summary["wall-seconds"],
        "peak-rss-mb": result.summary.get("peak-rss-mb"),
        "overrides": RUNS[name][1],
    }


def table(results: dict, args: argparse.Namespace) -> str:
    """Final and best accuracy, bytes each way and wall time per run."""
    dense = results.get("dense")
    rows = []
    for name, result in results.items():
        ratio = f"{dense['bytes-up'] / result['bytes-up']:.1f}" if dense else "-"
        acc = [a for a in result["accuracy"] if a is not None]
        rows.append(
            [
                RUNS[name][0],
                f"{acc[-1]:.3f}",
                f"{max(acc[1:]):.3f}",
                format_bytes(result["bytes-up"]),
                ratio,
                format_bytes(result["bytes-down"]),
                f"{result['wall-seconds'] / 60:.1f} min",
            ]
        )
    header = ["run", "final acc", "best acc", "uplink", "x fewer than dense", "downlink", "wall"]
    return "\n".join(
        [
            "# Uplink compression on the default task",
            "",
            "`examples/default.toml`: 8 Dirichlet(0.5) sites, 5 rounds x 25 local steps, MiniLM,",
            "LoRA r=8 (full-weight runs: no adapter, lr 2e-4), FedAvg, federated evaluation off.",
            "Bytes: serialized Flower messages over the whole run (the byte ledger). Regenerate:",
            "`python benchmarks/compression.py`.",
            "",
            harness.markdown_table(header, rows, spaced_rule=True),
        ]
    )


if __name__ == "__main__":
    harness.main("compression", __doc__, RUNS, run, table, indent=1)
