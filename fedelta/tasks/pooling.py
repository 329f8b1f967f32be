"""How an encoder classifier turns token states into the one vector its head reads.

``BertForSequenceClassification`` and its kin classify the ``[CLS]`` token through
a ``pooler`` (dense + tanh) trained by next-sentence prediction. Sentence encoders
such as all-MiniLM-L6-v2 were instead trained to be read as the *mean* of their
token states (sentence-transformers' ``1_Pooling/config.json`` says so), and their
pooler is an untrained leftover (MiniLM's: zero bias, weights of std 0.009). With
``model.pooling = "mean"`` the pooler is replaced by the attention-masked mean of
the last hidden states, so the head starts from the representation the encoder
was trained to produce. ``auto`` takes the checkpoint's own pooling config.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fedelta.assets import INFO_FILE
from fedelta.errors import UserError

POOLING_CONFIG = Path("1_Pooling") / "config.json"
"""Where a sentence-transformers checkpoint states how it pools."""


class PoolingError(UserError, ValueError):
    """The model has no pooler that ``model.pooling = "mean"`` could replace."""


def checkpoint_pooling(path: str) -> str:
    """``mean`` when the checkpoint folder says it was trained with mean pooling (its
    sentence-transformers config, or the ``fedelta.json`` of a model fedelta wrote),
    else ``cls`` (also for hub ids and folders without a pooling config)."""
    info = Path(path) / INFO_FILE
    if info.is_file():
        return json.loads(info.read_text(encoding="utf-8")).get("pooling", "cls")
    config = Path(path) / POOLING_CONFIG
    if not config.is_file():
        return "cls"
    settings = json.loads(config.read_text(encoding="utf-8"))
    return "mean" if settings.get("pooling_mode_mean_tokens") else "cls"


class MeanPooling(torch.nn.Module):
    """The attention-masked mean of the token states, in the pooler's place.

    A pooler sees only the hidden states, so the encoder's attention mask is
    handed over by a forward pre-hook on the encoder (see :func:`apply_pooling`).
    """

    def __init__(self) -> None:
        super().__init__()
        self.mask: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        mask = self.mask
        if mask is None:
            mask = torch.ones(hidden_states.shape[:2], device=hidden_states.device)
        weights = mask.to(hidden_states.dtype).unsqueeze(-1)
        return (hidden_states * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def _remember_mask(pooling: MeanPooling):
    def hook(_module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1:
            mask = args[1]
        pooling.mask = mask

    return hook


def apply_pooling(model: torch.nn.Module, mode: str, source: str) -> torch.nn.Module:
    """Make ``model`` (a Transformers sequence classifier) pool as ``mode`` says
    (``cls`` leaves it as built). ``source`` names the checkpoint in errors."""
    if mode == "cls":
        return model
    encoder = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if encoder is None or getattr(encoder, "pooler", None) is None:
        raise PoolingError(
            f"model.pooling = {mode!r} replaces the encoder's pooler, and model "
            f"'{source}' has none; use model.pooling = \"cls\""
        )
    pooling = MeanPooling()
    encoder.pooler = pooling
    encoder.register_forward_pre_hook(_remember_mask(pooling), with_kwargs=True)
    return model


def resolve_pooling(mode: str, path: str) -> str:
    """``mode``, with ``auto`` replaced by what the checkpoint at ``path`` says."""
    return checkpoint_pooling(path) if mode == "auto" else mode


def pooling_of(model: torch.nn.Module) -> str:
    """How a built model pools (``mean`` once :func:`apply_pooling` replaced its pooler)."""
    return "mean" if any(isinstance(m, MeanPooling) for m in model.modules()) else "cls"
