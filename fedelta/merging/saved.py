"""``fedelta merge``: merge saved adapters or delta files with one operator.

* Plain safetensors delta files are merged tensor by tensor; the result equals
  ``peft.utils.merge_utils`` on the same inputs.
* Adapters are merged on their products by default: each module's
  ``scale * B @ A`` (and each head) is materialised, merged, and added to the base
  model, which is written as a plain Transformers model folder. With
  ``lora_mode="factors"`` the A and B factors are merged separately, as peft's
  ``add_weighted_adapter`` does for its non-SVD combinations: the result is an
  adapter of the same rank, but the product of merged factors is not the merge
  of the products (exact only for one input, or for linear operators with a
  shared A).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fedelta.merging.operators import MERGE_METHODS, merge_tensors
from fedelta.merging.task_vectors import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    INFO_FILE,
    TaskVector,
    TaskVectorError,
    apply,
    from_adapter,
    is_adapter,
    read_info,
    save_model_folder,
)
from fedelta.models import load_base_model
from fedelta.seeding import derive_seed

LORA_MODES = ("product", "factors")


def default_weights(method: str, count: int) -> list[float]:
    """Equal shares summing to 1 for sum-type merges (an average), 1 each for TIES-type
    merges (which already average over the agreeing inputs)."""
    return [1.0] * count if MERGE_METHODS[method].disjoint else [1.0 / count] * count


def merge_dicts(
    inputs: Sequence[dict[str, torch.Tensor]],
    method: str,
    weights: Sequence[float],
    density: float,
    seed: int,
) -> dict[str, torch.Tensor]:
    """Merge same-keyed tensor dicts key by key (sorted keys; DARE seeded per key)."""
    keys = set(inputs[0])
    for i, tensors in enumerate(inputs[1:], 1):
        if set(tensors) != keys:
            diff = sorted(set(tensors) ^ keys)[:3]
            raise TaskVectorError(f"input {i} has other tensors than input 0: {diff}")
    return {
        k: merge_tensors(method, [t[k] for t in inputs], weights, density, derive_seed(seed, i))
        for i, k in enumerate(sorted(keys))
    }


def merge_saved(
    sources: Sequence[Path],
    out: Path,
    method: str,
    weights: Sequence[float] | None = None,
    density: float = 1.0,
    seed: int = 0,
    lora_mode: str = "product",
) -> Path:
    """Merge ``sources`` (all delta files, or all adapters) into ``out``; returns the path
    written (a file for delta files, a folder for adapters)."""
    if len(sources) < 2:
        raise TaskVectorError("merging needs at least two inputs")
    if method not in MERGE_METHODS:
        raise TaskVectorError(f"unknown method {method!r}; one of {', '.join(MERGE_METHODS)}")
    weights = list(weights) if weights else default_weights(method, len(sources))
    if len(weights) != len(sources):
        raise TaskVectorError(f"{len(weights)} weights for {len(sources)} inputs")
    if all(s.is_file() for s in sources):
        merged = merge_dicts([load_file(str(s)) for s in sources], method, weights, density, seed)
        path = out if out.suffix == ".safetensors" else out / "delta.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in merged.items()}, str(path))
        return path
    if not all(is_adapter(s) for s in sources):
        raise TaskVectorError(
            "inputs must all be safetensors delta files or all be adapter folders "
            f"(with {ADAPTER_CONFIG})"
        )
    if lora_mode == "factors":
        return _merge_factors(sources, out, method, weights, density, seed)
    if lora_mode != "product":
        raise TaskVectorError(f"lora mode must be one of {LORA_MODES}, got {lora_mode!r}")
    return _merge_products(sources, out, method, weights, density, seed)


def _merge_factors(
    sources: Sequence[Path],
    out: Path,
    method: str,
    weights: Sequence[float],
    density: float,
    seed: int,
) -> Path:
    configs = [json.loads((s / ADAPTER_CONFIG).read_text(encoding="utf-8")) for s in sources]
    for s, c in zip(sources[1:], configs[1:], strict=True):
        for key in ("r", "lora_alpha", "target_modules", "use_rslora"):
            if c.get(key) != configs[0].get(key):
                raise TaskVectorError(
                    f"'{s}' has {key} = {c.get(key)!r}, '{sources[0]}' {configs[0].get(key)!r}: "
                    "factor-wise merging needs identical adapters; use the product mode"
                )
    for source in sources:
        if read_info(source).get("base-corrections"):
            raise TaskVectorError(
                f"'{source}' carries base-weight corrections (FedEx-LoRA / FLoRA), which "
                "factors cannot hold; merge it in the product mode"
            )
    merged = merge_dicts(
        [load_file(str(s / ADAPTER_WEIGHTS)) for s in sources], method, weights, density, seed
    )
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in merged.items()}, str(out / ADAPTER_WEIGHTS))
    shutil.copy(sources[0] / ADAPTER_CONFIG, out / ADAPTER_CONFIG)
    info = read_info(sources[0])
    if info:
        (out / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return out


def _merge_products(
    sources: Sequence[Path],
    out: Path,
    method: str,
    weights: Sequence[float],
    density: float,
    seed: int,
) -> Path:
    vectors = [from_adapter(s) for s in sources]
    infos: list[dict[str, Any]] = [v.info for v in vectors]
    base = (
        infos[0].get("base-model")
        or json.loads((sources[0] / ADAPTER_CONFIG).read_text(encoding="utf-8"))[
            "base_model_name_or_path"
        ]
    )
    for s, info in zip(sources[1:], infos[1:], strict=True):
        if info.get("base-model", base) != base:
            raise TaskVectorError(
                f"'{s}' was trained on {info.get('base-model')!r}, '{sources[0]}' on {base!r}"
            )
        if (pooling := info.get("pooling", "cls")) != infos[0].get("pooling", "cls"):
            raise TaskVectorError(
                f"'{s}' pools with {pooling!r}, '{sources[0]}' with "
                f"{infos[0].get('pooling', 'cls')!r}: their heads read different vectors"
            )
    delta = merge_dicts([v.delta for v in vectors], method, weights, density, seed)
    heads = merge_dicts([v.replace for v in vectors], method, weights, density, seed)
    merged = TaskVector(delta, heads, infos[0])
    pooling = infos[0].get("pooling", "cls")
    model = apply(load_base_model(base, len(merged.labels), merged.task, pooling), merged)
    merge = {"method": method, "density": density, "weights": list(weights)}
    return save_model_folder(model, out, merged, base, merged=merge)
