"""Sparse deltas: the coordinates a client changed, as flat indices and values.

A sparse tensor on the wire is its values and, unless every process can derive
them (seeded masks), its flat indices in the smallest unsigned integer type that
holds the tensor's size (``uint16`` up to 65,536 elements, ``uint32`` beyond), so an
index costs 2 or 4 bytes. Indices are sorted and unique: a duplicate would let one
client add to a coordinate twice, so the server refuses them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch


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


def densify(delta: Delta) -> dict[str, torch.Tensor]:
    """Every tensor of ``delta`` dense (zeros where a sparse tensor has no entry)."""
    return {k: v.dense() if isinstance(v, SparseTensor) else v for k, v in delta.items()}


def count_for(numel: int, density: float) -> int:
    """How many entries a tensor of ``numel`` elements keeps at ``density`` (at least 1)."""
    return min(numel, max(1, math.ceil(density * numel)))


def index_dtype(numel: int) -> np.dtype:
    """The smallest unsigned integer type that indexes ``numel`` elements."""
    if numel <= 2**16:
        return np.dtype(np.uint16)
    if numel <= 2**32:
        return np.dtype(np.uint32)
    return np.dtype(np.int64)
