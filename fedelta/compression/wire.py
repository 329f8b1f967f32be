"""A client delta on the wire: dense or sparse tensors, quantized, packed in one
``ArrayRecord``.

Flower spends about 520 bytes on every ``Array`` it carries (its own object with
dtype, shape and content hash), more than a sparse LoRA factor's payload. So the
tensors of a delta are packed: in the sorted order of their names, the record
holds one ``values`` array (each tensor's values flattened, or its kept entries),
one ``indices`` array (flat indices of the sparse tensors whose indices are not
derived from the round seed; the smallest unsigned type that fits the largest
tensor) and, for int8 codecs, one ``scales`` array. Segment lengths follow from
the run's layout and density, which the server knows; :func:`decode_delta`
checks every array and every segment (dtype, length, index range and order,
scales, finite values) before anything is aggregated, and raises
:class:`~fedelta.errors.InvalidUpdateError` naming the tensor otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fedelta.compression.quantization import Codec
from fedelta.compression.sparse import index_dtype
from fedelta.errors import InvalidUpdateError
from fedelta.tensors import SparseTensor

VALUES = "values"
INDICES = "indices"
SCALES = "scales"


@dataclass(frozen=True)
class TensorFormat:
    """What the server expects for one tensor of a reply."""

    shape: tuple[int, ...]
    count: int | None = None
    """Entries of a sparse tensor (None: dense)."""
    indices: torch.Tensor | None = None
    """Indices both sides derive (seeded masks): not sent."""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def length(self) -> int:
        """Values this tensor contributes to the packed ``values`` array."""
        return self.numel if self.count is None else self.count

    @property
    def sends_indices(self) -> bool:
        return self.count is not None and self.indices is None


def format_of(tensor: torch.Tensor | SparseTensor, send_indices: bool) -> TensorFormat:
    """The format ``tensor`` is encoded in (what the server will expect for it)."""
    if isinstance(tensor, SparseTensor):
        known = None if send_indices else tensor.indices
        return TensorFormat(tensor.shape, len(tensor.values), known)
    return TensorFormat(tuple(tensor.shape))


def encode_delta(
    delta: Mapping[str, torch.Tensor | SparseTensor],
    codec: Codec,
    send_indices: bool = True,
    generator: torch.Generator | None = None,
) -> ArrayRecord:
    """``delta`` packed in wire form; sparse tensors carry indices when ``send_indices``."""
    values, scales, indices = [], [], []
    sparse_numels = [t.numel for t in delta.values() if isinstance(t, SparseTensor)]
    idx_type = index_dtype(max(sparse_numels, default=1))  # as decode_delta expects
    for name in sorted(delta):
        tensor = delta[name]
        if isinstance(tensor, SparseTensor):
            flat = tensor.values
            if send_indices:
                indices.append(tensor.indices.numpy().astype(idx_type))
        else:
            flat = tensor.detach().cpu().float().reshape(-1)
        encoded, tensor_scales = codec.encode(flat, generator)
        values.append(encoded)
        if tensor_scales is not None:
            scales.append(tensor_scales)
    record = ArrayRecord()
    record[VALUES] = Array(np.ascontiguousarray(np.concatenate(values)))
    if codec.has_scales:
        record[SCALES] = Array(np.ascontiguousarray(np.concatenate(scales)))
    if indices:
        record[INDICES] = Array(np.ascontiguousarray(np.concatenate(indices)))
    return record


def decode_delta(
    record: ArrayRecord, formats: Mapping[str, TensorFormat], codec: Codec
) -> dict[str, torch.Tensor | SparseTensor]:
    """The delta in ``record``, validated against ``formats`` and ``codec``."""
    names = sorted(formats)
    expected = {VALUES}
    if codec.has_scales:
        expected.add(SCALES)
    if any(formats[n].sends_indices for n in names):
        expected.add(INDICES)
    missing, unexpected = expected - record.keys(), record.keys() - expected
    if missing:
        raise InvalidUpdateError(f"missing arrays: {', '.join(sorted(missing))}")
    if unexpected:
        raise InvalidUpdateError(f"unexpected arrays: {', '.join(sorted(unexpected)[:3])}")

    values = _read(record, VALUES, codec.wire_dtype)
    _check_length(VALUES, values, sum(formats[n].length for n in names))
    scales = None
    if codec.has_scales:
        scales = _read(record, SCALES, np.dtype(np.float32))
        _check_length(SCALES, scales, sum(codec.scale_count(formats[n].length) for n in names))
        if not (np.isfinite(scales).all() and (scales >= 0).all()):
            raise InvalidUpdateError(f"'{SCALES}' has negative or non-finite scales")
    indices = None
    if INDICES in expected:
        sparse = [formats[n] for n in names if formats[n].sends_indices]
        indices = _read(record, INDICES, index_dtype(max(f.numel for f in sparse)))
        _check_length(INDICES, indices, sum(f.count or 0 for f in sparse))

    # Unscaled values are checked in one pass (the per-tensor check below names the
    # tensor only when this one fails); scaled ones are checked after scaling.
    check_each = codec.has_scales or not np.isfinite(values).all()
    out: dict[str, torch.Tensor | SparseTensor] = {}
    v_at = s_at = i_at = 0
    for name in names:
        fmt = formats[name]
        segment, segment_scales = values[v_at : v_at + fmt.length], None
        v_at += fmt.length
        if scales is not None:
            n_scales = codec.scale_count(fmt.length)
            segment_scales = scales[s_at : s_at + n_scales]
            s_at += n_scales
        decoded = codec.decode(segment, segment_scales)
        if check_each and not torch.isfinite(decoded).all():
            raise InvalidUpdateError(f"tensor '{name}' has non-finite values")
        if fmt.count is None:
            out[name] = decoded.view(fmt.shape)
            continue
        if fmt.sends_indices:
            assert indices is not None
            idx = _checked_indices(name, indices[i_at : i_at + fmt.count], fmt.numel)
            i_at += fmt.count
        else:
            idx = fmt.indices
        out[name] = SparseTensor(idx, decoded, fmt.shape)
    return out


def _read(record: ArrayRecord, key: str, dtype: np.dtype) -> np.ndarray:
    try:
        array = record[key].numpy()
    except Exception as err:  # malformed bytes: numpy raises several types
        raise InvalidUpdateError(f"'{key}' cannot be decoded: {err}") from err
    if array.dtype != dtype or array.ndim != 1:
        raise InvalidUpdateError(
            f"'{key}' must be a 1-d {dtype} array, got {array.dtype} of shape {array.shape}"
        )
    return array


def _check_length(key: str, array: np.ndarray, expected: int) -> None:
    if len(array) != expected:
        raise InvalidUpdateError(f"'{key}' holds {len(array)} entries, expected {expected}")


def _checked_indices(name: str, raw: np.ndarray, numel: int) -> torch.Tensor:
    indices = torch.from_numpy(raw.astype(np.int64))
    if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= numel):
        raise InvalidUpdateError(f"tensor '{name}' has indices outside [0, {numel})")
    if len(indices) > 1 and not bool((indices[1:] > indices[:-1]).all()):
        raise InvalidUpdateError(f"tensor '{name}' has indices not strictly increasing")
    return indices
