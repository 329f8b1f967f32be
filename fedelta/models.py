"""Build a PEFT model once per process and move its trainable state in and out.

What a federation exchanges is the *adapter state*: the LoRA factors (also a
frozen A, under FFA-LoRA) and, for classification, the trainable head, keyed by
their parameter names. The task (:mod:`fedelta.tasks`) picks the model class. Building a transformer
costs seconds, so each process builds its model once per configuration and
only the trainable tensors are reset from each message.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as transformers_logging

from fedelta.assets import GGUF_MODELS, MODELS
from fedelta.errors import UserError
from fedelta.gguf_cache import cached_copy
from fedelta.lora import is_factor, lora_layers, seeded_lora_A
from fedelta.tasks import TASKS
from fedelta.tensors import HEAD_MODULES, TensorDict


class ModelNotFoundError(UserError, FileNotFoundError):
    """``model.name`` is neither a built-in alias, a local folder nor a cached hub id."""


@dataclass(frozen=True)
class ModelSpec:
    """What determines a built model; hashable so it can key the per-process cache."""

    name: str
    num_labels: int
    """Outputs of the classification head (0 for a causal LM)."""
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    target_modules: tuple[str, ...]
    seed: int
    global_rank: int = 0
    """The server's rank; this model's A is the first ``lora_r`` rows of the seeded
    global A (0: same as ``lora_r``)."""
    use_rslora: bool = False
    freeze_lora_a: bool = False
    """Keep A at its seeded initialisation (FFA-LoRA)."""
    finetuning: str = "lora"
    """``lora``: adapters on ``target_modules``; ``full``: those modules' own weights."""
    task: str = "classification"
    pooling: str = "cls"
    """``model.pooling``: ``cls``, ``mean`` or ``auto`` (the checkpoint's own)."""


def resolve_model_path(name: str) -> str:
    """Map ``model.name`` to something ``from_pretrained`` loads without a network."""
    if name in MODELS:
        return str(MODELS[name].path())
    if name in GGUF_MODELS:
        return str(cached_copy(GGUF_MODELS[name].path(), name))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"model folder '{path}' has no config.json")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelNotFoundError(f"model path '{name}' does not exist")
    return name  # a hub id; transformers resolves it from the local cache when offline


def load_base_model(
    name: str, num_labels: int, task: str = "classification", pooling: str = "cls"
) -> torch.nn.Module:
    """The pretrained model for ``task``: with a fresh classification head of
    ``num_labels`` over tokens pooled as ``pooling`` says, or a causal LM as it was
    released."""
    path = resolve_model_path(name)
    # A newly initialised head and per-layer loading bars are expected, not news.
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        return TASKS[task].load_pretrained(path, num_labels, pooling)
    except OSError as err:
        raise ModelNotFoundError(
            f"cannot load model '{name}': {err}. Use a built-in alias "
            f"({', '.join(MODELS | GGUF_MODELS)}), a local model folder, or a hub id "
            "already in the cache"
        ) from err


def load_tokenizer(name: str, task: str = "classification") -> PreTrainedTokenizerBase:
    """The model's tokenizer, with what ``task`` needs filled in (chat template, pad)."""
    return TASKS[task].prepare_tokenizer(AutoTokenizer.from_pretrained(resolve_model_path(name)))


def build_model(spec: ModelSpec) -> torch.nn.Module:
    """The model ``spec`` describes: base plus LoRA adapters, or (full fine-tuning) the
    base with only the target modules and the head trainable. Seeded, so every
    process starts from the same initialisation."""
    torch.manual_seed(spec.seed)
    base = load_base_model(spec.name, spec.num_labels, spec.task, spec.pooling)
    if spec.finetuning == "full":
        return _full_finetuning(base, spec)
    lora = LoraConfig(
        task_type=TASKS[spec.task].peft_task_type,
        r=spec.lora_r,
        lora_alpha=spec.lora_alpha,
        lora_dropout=spec.lora_dropout,
        target_modules=list(spec.target_modules),
        use_rslora=spec.use_rslora,
    )
    try:
        model = get_peft_model(base, lora)
    except ValueError as err:
        raise ValueError(
            f"lora.target-modules {list(spec.target_modules)} do not fit model '{spec.name}': {err}"
        ) from err
    seed_lora_a(model, spec.seed, spec.global_rank or spec.lora_r, freeze=spec.freeze_lora_a)
    return model


def _full_finetuning(model: torch.nn.Module, spec: ModelSpec) -> torch.nn.Module:
    """Freeze everything but the target modules' weights and biases and the head."""
    targets = spec.target_modules
    matched = False
    for module_name, module in model.named_modules():
        top = module_name.split(".")[0]
        is_target = any(module_name == t or module_name.endswith("." + t) for t in targets)
        trainable = (is_target and isinstance(module, torch.nn.Linear)) or top in HEAD_MODULES
        matched |= is_target and isinstance(module, torch.nn.Linear)
        for param in module.parameters(recurse=False):
            param.requires_grad_(trainable)
    if not matched:
        raise ValueError(
            f"lora.target-modules {list(targets)} name no linear module of '{spec.name}'"
        )
    return model


def seed_lora_a(model: torch.nn.Module, seed: int, global_rank: int, freeze: bool) -> None:
    """Draw every A from fedelta's per-module seed at the global rank (a prefix of it
    at lower ranks), so clients of any rank and the server agree on A."""
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            weight = layer.lora_A["default"].weight
            rank, in_features = weight.shape
            weight.copy_(seeded_lora_A(seed, name, global_rank, in_features)[:rank])
            weight.requires_grad_(not freeze)


@dataclass(frozen=True)
class BuiltModel:
    """A process-wide model, its tokenizer, and its trainable state as first built."""

    model: torch.nn.Module
    """A ``PeftModel`` (LoRA) or the plain Transformers model (full fine-tuning)."""
    tokenizer: PreTrainedTokenizerBase
    initial_state: TensorDict
    """Seeded, so identical in every process; a run starts from it, never from
    whatever state an earlier run in the same process left in ``model``."""


@functools.lru_cache(maxsize=6)
def cached_model(spec: ModelSpec) -> BuiltModel:
    """The process-wide model for ``spec``, built on first use."""
    model = build_model(spec)
    return BuiltModel(model, load_tokenizer(spec.name, spec.task), adapter_state(model))


def _adapter_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad or is_factor(n)}


def adapter_state(model: torch.nn.Module) -> TensorDict:
    """Copies of the LoRA factors and other trainable parameters, by name, as fp32."""
    return {
        name: param.detach().to(torch.float32).clone()
        for name, param in _adapter_params(model).items()
    }


def adapter_layout(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the adapter state."""
    return {name: tuple(p.shape) for name, p in _adapter_params(model).items()}


def load_adapter_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Overwrite the adapter parameters; the key set and shapes must match exactly."""
    params = _adapter_params(model)
    missing, unexpected = params.keys() - state.keys(), state.keys() - params.keys()
    if missing or unexpected:
        raise KeyError(
            f"trainable state does not match the model: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}"
        )
    with torch.no_grad():
        for name, param in params.items():
            if param.shape != state[name].shape:
                raise ValueError(
                    f"trainable tensor '{name}' has shape {tuple(state[name].shape)}, "
                    f"model expects {tuple(param.shape)}"
                )
            param.copy_(state[name])
