"""Diff-vector transfer: a fine-tuning delta learned on one base version, applied to another.

Fine-tuning Transfer (Lin et al., 2025, arXiv 2503.20110) and PortLLM show that the
difference a fine-tuning made to version 1 of a base model often carries over
when added to version 2, without training on v2. Whether it can depends on how
far v2 moved from v1 relative to the delta, and in which direction: the
diagnostic reports, per block and overall, ``|v2 - v1| / |delta|`` and the
cosine between ``v2 - v1`` and the delta, on the tensors the delta changes.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from fedelta.merging.layers import UnknownLayerError, scheme_for
from fedelta.merging.task_vectors import (
    TaskVector,
    TaskVectorError,
    apply,
    from_adapter,
    from_file,
    from_models,
    is_adapter,
    read_info,
    save_model_folder,
)
from fedelta.models import load_base_model

REPORT_FILE = "transfer.json"


@dataclass(frozen=True)
class Shift:
    """How a base-model update relates to a fine-tuning delta, over some tensors."""

    where: str
    """``all`` or a block (``block 3``, ``embeddings``/``after`` the blocks)."""
    shift_norm: float
    """``|v2 - v1|`` on the tensors the delta changes."""
    delta_norm: float
    relative: float
    """``shift_norm / delta_norm``: above ~1, v2 moved further than fine-tuning did."""
    cosine: float


def load_vector(source: Path, base_from: str) -> TaskVector:
    """The delta of a run directory (its ``adapter/``), an exported adapter, a fully
    fine-tuned model folder (minus ``base_from``) or a safetensors delta file."""
    if (source / "adapter").is_dir():
        source = source / "adapter"
    if source.is_file():
        return from_file(source)
    if is_adapter(source):
        return from_adapter(source)
    if (source / "config.json").is_file():
        info = read_info(source)
        task, labels = info.get("task", "classification"), info.get("labels", [])
        pooling = info.get("pooling", "cls")
        tuned = load_base_model(str(source), len(labels), task, pooling)
        return from_models(tuned, load_base_model(base_from, len(labels), task, pooling), info)
    raise TaskVectorError(
        f"'{source}' is not a run directory, an adapter, a model folder or a delta file"
    )


def shifts(
    vector: TaskVector, v1: torch.nn.Module, v2: torch.nn.Module
) -> tuple[Shift, list[Shift]]:
    """The overall and per-block relation of ``v2 - v1`` to the delta."""
    p1, p2 = v1.state_dict(), v2.state_dict()
    config = v1.config
    try:
        scheme = scheme_for(config.model_type)
    except UnknownLayerError:
        scheme = None
    groups: dict[str, list[str]] = {}
    for name in vector.delta:
        if name not in p1 or name not in p2 or p1[name].shape != p2[name].shape:
            raise TaskVectorError(f"tensor '{name}' differs in shape between the two versions")
        where = "all blocks"
        if scheme is not None:
            try:
                where = f"block {scheme.depth(name, config.num_hidden_layers)}"
            except UnknownLayerError:
                where = "other"
        groups.setdefault(where, []).append(name)

    def measure(where: str, names: list[str]) -> Shift:
        dot = shift_sq = delta_sq = 0.0
        for n in names:
            shift = (p2[n].float() - p1[n].float()).flatten()
            delta = vector.delta[n].flatten()
            dot += float(shift @ delta)
            shift_sq += float(shift @ shift)
            delta_sq += float(delta @ delta)
        shift_norm, delta_norm = math.sqrt(shift_sq), math.sqrt(delta_sq)
        cosine = dot / (shift_norm * delta_norm) if shift_norm and delta_norm else 0.0
        relative = shift_norm / delta_norm if delta_norm else math.inf
        return Shift(where, shift_norm, delta_norm, relative, cosine)

    per_block = [measure(where, names) for where, names in sorted(groups.items(), key=_order)]
    return measure("all", list(vector.delta)), per_block


def _order(item: tuple[str, list[str]]) -> tuple[int, str]:
    where = item[0]
    return (int(where.split()[1]) if where.startswith("block ") else 10**6, where)


def transfer(source: Path, base_from: str, base_to: str, out: Path) -> dict[str, Any]:
    """Apply ``source``'s delta (learned on ``base_from``) to ``base_to``; write the
    result as a model folder ``out`` and its diagnostic as ``out/transfer.json``."""
    vector = load_vector(source, base_from)
    labels, task = vector.labels, vector.task
    if not labels and vector.replace and task == "classification":
        head = next(v for k, v in vector.replace.items() if k.endswith("weight"))
        labels = [str(i) for i in range(head.shape[0])]
    pooling = vector.info.get("pooling", "cls")
    v1 = load_base_model(base_from, len(labels), task, pooling)
    v2 = load_base_model(base_to, len(labels), task, pooling)
    overall, per_block = shifts(vector, v1, v2)
    vector.info["labels"] = labels
    save_model_folder(
        apply(v2, vector), out, vector, base_to, transferred_from=base_from, delta=str(source)
    )
    report = {
        "from": base_from,
        "to": base_to,
        "delta": str(source),
        "tensors": len(vector.delta),
        "overall": asdict(overall),
        "per-block": [asdict(s) for s in per_block],
    }
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def format_shifts(report: dict[str, Any]) -> str:
    """The diagnostic as a console table."""
    rows = [report["overall"], *report["per-block"]]
    lines = [f"{'where':<12} {'|v2-v1|':>10} {'|delta|':>10} {'ratio':>8} {'cosine':>8}"]
    for r in rows:
        lines.append(
            f"{r['where']:<12} {r['shift_norm']:>10.4f} {r['delta_norm']:>10.4f} "
            f"{r['relative']:>8.3f} {r['cosine']:>8.3f}"
        )
    return "\n".join(lines)
