"""Norm bounding: scale a client's update down to a maximum L2 norm (Sun et al., 2019)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

TensorDict = dict[str, torch.Tensor]


def global_norm(update: Mapping[str, torch.Tensor]) -> float:
    """The L2 norm of all tensors of an update taken together."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in update.values()))


def clip_to_norm(update: Mapping[str, torch.Tensor], max_norm: float) -> tuple[TensorDict, bool]:
    """``update * min(1, max_norm / ||update||)`` and whether it was scaled."""
    norm = global_norm(update)
    if norm <= max_norm:
        return dict(update), False
    factor = max_norm / norm
    return {k: v * factor for k, v in update.items()}, True
