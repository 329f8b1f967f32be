"""Sparse and quantized client uploads: what crosses the wire, and how it is read back.

See :mod:`fedelta.compression.uplink` for the pipeline; the sparsity methods, codecs,
wire format, selection rules, training-time masks (SpIEL, LIFT), Half Fine-Tuning
and error feedback each have their own module. The sparse tensor itself is part of
the shared vocabulary (:class:`fedelta.tensors.SparseTensor`).
"""

from fedelta.compression.quantization import CODECS, Codec, build_codec
from fedelta.compression.sparse import SPARSITY, SparsityMethod
from fedelta.compression.uplink import ClientMemory, UplinkCompression

__all__ = [
    "CODECS",
    "SPARSITY",
    "SparsityMethod",
    "ClientMemory",
    "Codec",
    "UplinkCompression",
    "build_codec",
]
