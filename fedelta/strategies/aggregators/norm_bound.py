"""Norm bounding: scale a client's update down to a maximum L2 norm (Sun et al., 2019)."""

from __future__ import annotations

import math

from fedelta.compression.sparse import Delta, SparseTensor


def global_norm(update: Delta) -> float:
    """The L2 norm of all tensors of an update (dense or sparse) taken together."""
    return math.sqrt(
        sum(
            float((t.values if isinstance(t, SparseTensor) else t).double().pow(2).sum())
            for t in update.values()
        )
    )


def clip_to_norm(update: Delta, max_norm: float) -> tuple[dict, bool]:
    """``update * min(1, max_norm / ||update||)`` and whether it was scaled."""
    norm = global_norm(update)
    if norm <= max_norm:
        return dict(update), False
    factor = max_norm / norm
    return {
        k: v.scaled(factor) if isinstance(v, SparseTensor) else v * factor
        for k, v in update.items()
    }, True
