"""The tensor vocabulary every layer shares: named tensors, the head, layouts, sparse deltas, norms.

A model's trainable state travels as a mapping from parameter name to tensor. A
client's delta may hold :class:`SparseTensor` entries (flat indices and values)
beside dense ones; :func:`densify` turns it back into plain tensors. Norms and
clipping work on either form, so clients (DP noise shares) and the server (norm
bounding, client-level DP) bound updates with the same code.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

TensorDict = dict[str, torch.Tensor]
"""Tensors by parameter name."""
Layout = Mapping[str, tuple[int, ...]]
"""Expected tensor names and shapes."""


HEAD_MODULES = ("classifier", "score")
"""Names of classification heads (peft's ``modules_to_save`` for SEQ_CLS)."""


def is_head(name: str) -> bool:
    """Whether trainable tensor ``name`` belongs to the classification head (newly
    initialised, tiny: always trained in full and sent dense)."""
    return any(part in HEAD_MODULES for part in name.split(".")[:4])


def layout_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """The names and shapes of ``tensors``."""
    return {name: tuple(t.shape) for name, t in tensors.items()}


@dataclass(frozen=True)
class SparseTensor:
    """A tensor of ``shape`` that is zero except at the flat ``indices``."""

    indices: torch.Tensor
    """int64, sorted, unique, each < numel."""
    values: torch.Tensor
    """fp32, one per index."""
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def dense(self) -> torch.Tensor:
        out = torch.zeros(self.numel, dtype=self.values.dtype)
        out[self.indices] = self.values
        return out.view(self.shape)

    def scaled(self, factor: float) -> SparseTensor:
        return SparseTensor(self.indices, self.values * factor, self.shape)

    @classmethod
    def gather(cls, tensor: torch.Tensor, indices: torch.Tensor) -> SparseTensor:
        """The entries of ``tensor`` at flat ``indices`` (sorted here)."""
        indices = torch.sort(indices.to(torch.int64)).values
        return cls(indices, tensor.reshape(-1)[indices].float(), tuple(tensor.shape))


Delta = Mapping[str, "torch.Tensor | SparseTensor"]
"""A client delta as decoded by the server: dense and sparse tensors by name."""


def densify(delta: Delta) -> TensorDict:
    """Every tensor of ``delta`` dense (zeros where a sparse tensor has no entry)."""
    return {k: v.dense() if isinstance(v, SparseTensor) else v for k, v in delta.items()}


def global_norm(update: Delta) -> float:
    """The L2 norm of all tensors of an update (dense or sparse) taken together."""
    return math.sqrt(
        sum(
            float((t.values if isinstance(t, SparseTensor) else t).double().pow(2).sum())
            for t in update.values()
        )
    )


def clip_to_norm(
    update: Delta, max_norm: float
) -> tuple[dict[str, torch.Tensor | SparseTensor], bool]:
    """``update * min(1, max_norm / ||update||)`` and whether it was scaled."""
    norm = global_norm(update)
    if norm <= max_norm:
        return dict(update), False
    factor = max_norm / norm
    return {
        k: v.scaled(factor) if isinstance(v, SparseTensor) else v * factor
        for k, v in update.items()
    }, True
