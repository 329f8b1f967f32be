"""Task vectors: what fine-tuning added to a base model, by the base model's tensor names.

A task vector is read from an exported adapter (each LoRA module's product
``scale * B @ A``, plus the base-weight corrections of folding strategies), from
a fully fine-tuned model folder (its weights minus the base's), or from a plain
safetensors file of deltas. Tensors the base model does not have in the same
form (a new classification head) are carried as values that replace the base's.
Applying one adds it to any base model with the same tensor names and shapes:
the base it was learned on, or a newer version of it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from fedelta.assets import INFO_FILE
from fedelta.errors import UserError
from fedelta.models import load_tokenizer

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class TaskVectorError(UserError, ValueError):
    """A task vector cannot be read or does not fit the model it is applied to."""


@dataclass
class TaskVector:
    delta: dict[str, torch.Tensor]
    """Added to the base tensor of the same name."""
    replace: dict[str, torch.Tensor] = field(default_factory=dict)
    """Set in place of the base tensor (new heads)."""
    info: dict[str, Any] = field(default_factory=dict)
    """``task``, ``labels`` and ``base-model`` when the source says them."""

    @property
    def task(self) -> str:
        return self.info.get("task", "classification")

    @property
    def labels(self) -> list[str]:
        return list(self.info.get("labels", []))


def read_info(folder: Path) -> dict[str, Any]:
    path = folder / INFO_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def is_adapter(path: Path) -> bool:
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file()


def from_adapter(folder: Path) -> TaskVector:
    """``scale * B @ A`` per adapted module (plus folded corrections); head values."""
    config = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    weights = load_file(str(folder / ADAPTER_WEIGHTS))
    if config.get("fan_in_fan_out"):
        raise TaskVectorError(f"'{folder}': fan_in_fan_out adapters are not supported")
    rank, alpha = config["r"], config["lora_alpha"]
    scale = alpha / rank**0.5 if config.get("use_rslora") else alpha / rank
    delta: dict[str, torch.Tensor] = {}
    replace: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        name = key.removeprefix(PEFT_PREFIX)
        if ".lora_A." in name:
            continue
        if ".lora_B." in name:
            module = name.split(".lora_B.")[0]
            a = weights[key.replace(".lora_B.", ".lora_A.")].float()
            delta[module + ".weight"] = scale * (value.float() @ a)
        else:
            replace[name] = value.float()
    info = read_info(folder)
    corrections = folder / str(info.get("base-corrections", ""))
    if info.get("base-corrections") and corrections.is_file():
        for module, fold in load_file(str(corrections)).items():
            name = module.removeprefix(PEFT_PREFIX) + ".weight"
            delta[name] = delta.get(name, 0) + fold.float()
    return TaskVector(delta, replace, info)


def from_models(fine_tuned: torch.nn.Module, base: torch.nn.Module, info: Mapping) -> TaskVector:
    """``fine_tuned - base`` for every tensor both have with one shape; the others of
    ``fine_tuned`` (a new head) replace the base's."""
    base_state = base.state_dict()
    delta, replace = {}, {}
    for name, value in fine_tuned.state_dict().items():
        if name in base_state and base_state[name].shape == value.shape:
            diff = value.float() - base_state[name].float()
            if diff.any():
                delta[name] = diff
        else:
            replace[name] = value.float()
    return TaskVector(delta, replace, dict(info))


def from_file(path: Path) -> TaskVector:
    """A safetensors file of deltas keyed by the base model's tensor names."""
    try:
        return TaskVector({k: v.float() for k, v in load_file(str(path)).items()})
    except Exception as err:  # safetensors raises its own error types
        raise TaskVectorError(f"cannot read delta file '{path}': {err}") from err


def apply(model: torch.nn.Module, vector: TaskVector, scale: float = 1.0) -> torch.nn.Module:
    """Add ``scale`` times the deltas to ``model`` and set the replaced tensors (in place)."""
    params = model.state_dict()
    for name, value in [*vector.delta.items(), *vector.replace.items()]:
        if name not in params:
            raise TaskVectorError(
                f"the model has no tensor '{name}' that the task vector changes; "
                "was it learned on another architecture?"
            )
        if params[name].shape != value.shape:
            raise TaskVectorError(
                f"tensor '{name}' has shape {tuple(params[name].shape)} in the model and "
                f"{tuple(value.shape)} in the task vector"
            )
    with torch.no_grad():
        for name, value in vector.delta.items():
            params[name].add_(scale * value.to(params[name].dtype))
        for name, value in vector.replace.items():
            params[name].copy_(value.to(params[name].dtype))
    return model


def save_model_folder(
    model: torch.nn.Module, out: Path, vector: TaskVector, base: str, **extra: Any
) -> Path:
    """Write ``model`` (a base with ``vector`` applied) as a Transformers folder with the
    base's tokenizer and a ``fedelta.json`` that :func:`fedelta.server.export.load_exported`
    and ``fedelta simulate --init-from`` read."""
    labels = vector.labels
    if labels:
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {name: i for i, name in enumerate(labels)}
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    load_tokenizer(base, vector.task).save_pretrained(str(out))
    info = {
        "base-model": base,
        "task": vector.task,
        "labels": labels,
        "finetuning": "full",
        **({"pooling": vector.info["pooling"]} if "pooling" in vector.info else {}),
        **{k.replace("_", "-"): v for k, v in extra.items()},
    }
    (out / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return out
