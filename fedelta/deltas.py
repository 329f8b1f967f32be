"""Dense tensors in an ``ArrayRecord``: the global state sent to clients, and what
a site keeps in its node state.

Each tensor is an ``Array`` (numpy ``.npy`` bytes, never pickled); floating
tensors that Flower cannot carry (bf16) are widened to fp32 first. Decoding
checks every tensor against the expected layout, so a malformed record is
rejected with a reason. Client uploads are packed differently (sparse, quantized):
see :mod:`fedelta.compression.wire`.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fedelta.errors import InvalidUpdateError
from fedelta.tensors import Layout, TensorDict

_WIRE_FLOATS = (torch.float16, torch.float32, torch.float64)


def encode(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Tensors to an ``ArrayRecord``, keeping names and order."""
    record = ArrayRecord()
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu()
        if tensor.is_floating_point() and tensor.dtype not in _WIRE_FLOATS:
            tensor = tensor.to(torch.float32)  # Flower's ArrayRecord rejects bf16
        record[name] = Array(np.ascontiguousarray(tensor.numpy()))
    return record


def decode(record: ArrayRecord, layout: Layout | None = None) -> TensorDict:
    """An ``ArrayRecord`` to fp32 tensors, validated against ``layout`` when given.

    Raises :class:`InvalidUpdateError` naming the first offending tensor.
    """
    if layout is not None:
        missing, unexpected = layout.keys() - record.keys(), record.keys() - layout.keys()
        if missing:
            raise InvalidUpdateError(f"missing tensors: {', '.join(sorted(missing)[:3])}")
        if unexpected:
            raise InvalidUpdateError(f"unexpected tensors: {', '.join(sorted(unexpected)[:3])}")
    tensors: TensorDict = {}
    for name, array in record.items():
        try:
            values = array.numpy()
        except Exception as err:  # malformed bytes: numpy raises several types
            raise InvalidUpdateError(f"tensor '{name}' cannot be decoded: {err}") from err
        if values.dtype.kind != "f":
            raise InvalidUpdateError(f"tensor '{name}' has dtype {values.dtype}, expected float")
        if layout is not None and tuple(values.shape) != tuple(layout[name]):
            raise InvalidUpdateError(
                f"tensor '{name}' has shape {tuple(values.shape)}, expected {tuple(layout[name])}"
            )
        tensor = torch.from_numpy(values.astype(np.float32, copy=False))
        if not torch.isfinite(tensor).all():
            raise InvalidUpdateError(f"tensor '{name}' has non-finite values")
        tensors[name] = tensor
    return tensors
