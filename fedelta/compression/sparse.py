"""How many entries a sparse upload keeps, and how its indices are typed.

A sparse tensor (:class:`fedelta.tensors.SparseTensor`) on the wire is its values
and, unless every process can derive them (seeded masks), its flat indices in the
smallest unsigned integer type that holds the tensor's size (``uint16`` up to 65,536
elements, ``uint32`` beyond), so an index costs 2 or 4 bytes. Indices are sorted and
unique: a duplicate would let one client add to a coordinate twice, so the server
refuses them.
"""

from __future__ import annotations

import math

import numpy as np


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
