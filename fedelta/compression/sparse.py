"""Sparsity methods: what each keeps and sends, how many entries, how indices are typed.

A sparse tensor (:class:`fedelta.tensors.SparseTensor`) on the wire is its values
and, unless every process can derive them (seeded masks), its flat indices in the
smallest unsigned integer type that holds the tensor's size (``uint16`` up to 65,536
elements, ``uint32`` beyond), so an index costs 2 or 4 bytes. Indices are sorted and
unique: a duplicate would let one client add to a coordinate twice, so the server
refuses them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedelta.registry import Registry


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


@dataclass(frozen=True)
class SparsityMethod:
    """What a ``compression.sparsity`` method does to an upload."""

    name: str
    summary: str
    sparse: bool
    """Sends a share (``compression.density``) of each tensor's entries."""
    sends_indices: bool
    """The kept indices travel with the values: each client's coordinates differ, so
    uploads cannot be summed blindly (secure aggregation refuses them)."""
    trains_mask: bool
    """Restricts training itself to the kept entries (and sends exactly those), rather
    than sparsifying a dense delta afterwards."""


SPARSITY: Registry[SparsityMethod] = Registry(
    "compression.sparsity",
    (
        SparsityMethod("none", "dense uploads", False, False, False),
        SparsityMethod("top-k", "the largest entries of the delta", True, True, False),
        SparsityMethod(
            "random-mask", "a mask seeded by the round, shared by all clients", True, False, False
        ),
        SparsityMethod(
            "spiel", "a trained index set, pruned and regrown (SpIEL)", True, True, True
        ),
        SparsityMethod(
            "lift", "the principal weights of a low-rank approximation (LIFT)", True, True, True
        ),
    ),
)
"""What ``compression.sparsity`` may name."""
