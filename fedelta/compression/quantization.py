"""Quantization codecs for delta values: fp32, fp16, and int8 with per-tensor or
per-block scales, optionally with stochastic rounding.

int8 maps ``v`` to ``round(v / s)`` in [-127, 127] with ``s = max|v| / 127`` over the
tensor or over each block of ``block_size`` consecutive values (flat order), so one
outlier only coarsens its own block. Deterministic rounding errs by at most
``s / 2`` per value; stochastic rounding (``floor(v / s + u)``, ``u ~ U[0, 1)``) errs by
less than ``s`` but is unbiased, which matters when many clients' errors add up.
Every codec states its bound (:meth:`Codec.error_bound`); tests hold it to it.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np
import torch

from fedelta.config import CompressionConfig
from fedelta.registry import Registry

FP16_MAX = 65504.0


class Codec(ABC):
    """Turns a flat fp32 tensor into wire values (and scales) and back."""

    name: str
    wire_dtype: ClassVar[np.dtype]
    """The dtype of the value array on the wire (anything else is refused)."""
    has_scales: ClassVar[bool] = False
    exact: ClassVar[bool] = False
    """Decodes to exactly the fp32 values encoded (no quantization)."""

    @classmethod
    def from_config(cls, settings: CompressionConfig) -> Codec:
        """The codec ``compression.quantization`` names, with a run's ``[compression]``
        settings."""
        return cls()

    @abstractmethod
    def encode(
        self, values: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Wire values and, for codecs with scales, the fp32 scales."""

    @abstractmethod
    def decode(self, values: np.ndarray, scales: np.ndarray | None = None) -> torch.Tensor:
        """fp32 values from what :meth:`encode` produced."""

    @abstractmethod
    def error_bound(self, values: torch.Tensor) -> float:
        """The largest absolute error a decoded value of ``values`` can have."""

    def scale_count(self, numel: int) -> int:
        """How many scales a tensor of ``numel`` values carries (0 without scales)."""
        return 0


class Fp32(Codec):
    name = "none"
    summary = "fp32 values"
    wire_dtype = np.dtype(np.float32)
    exact = True

    def encode(
        self, values: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        return values.detach().to(torch.float32).numpy(), None

    def decode(self, values: np.ndarray, scales: np.ndarray | None = None) -> torch.Tensor:
        return torch.from_numpy(values.astype(np.float32, copy=False))

    def error_bound(self, values: torch.Tensor) -> float:
        return 0.0


class Fp16(Codec):
    name = "fp16"
    summary = "fp16 values"
    wire_dtype = np.dtype(np.float16)

    def encode(
        self, values: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        peak = float(values.abs().max()) if values.numel() else 0.0
        if peak > FP16_MAX:
            raise OverflowError(f"a value of magnitude {peak:.3g} does not fit fp16")
        return values.detach().to(torch.float16).numpy(), None

    def decode(self, values: np.ndarray, scales: np.ndarray | None = None) -> torch.Tensor:
        return torch.from_numpy(values.astype(np.float32))

    def error_bound(self, values: torch.Tensor) -> float:
        # Half a unit in the last place: 2^-11 relative for normals, 2^-25 absolute
        # for subnormals.
        peak = float(values.abs().max()) if values.numel() else 0.0
        return max(peak * 2.0**-11, 2.0**-25)


class Int8(Codec):
    """int8 values with one fp32 scale per block (the whole tensor when ``block_size=0``)."""

    wire_dtype = np.dtype(np.int8)
    has_scales = True

    def __init__(self, block_size: int = 0, stochastic: bool = False) -> None:
        self.block_size = block_size
        self.stochastic = stochastic
        self.name = "int8-block" if block_size else "int8"

    @classmethod
    def from_config(cls, settings: CompressionConfig) -> Int8:
        block_size = settings.block_size if settings.quantization == "int8-block" else 0
        return cls(block_size, settings.stochastic_rounding)

    def scale_count(self, numel: int) -> int:
        if not self.block_size:
            return 1
        return max(1, math.ceil(numel / self.block_size))

    def _blocks(self, flat: torch.Tensor) -> torch.Tensor:
        """``flat`` zero-padded to whole blocks, one block per row."""
        size = self.block_size or max(1, flat.numel())
        pad = (-flat.numel()) % size
        return torch.cat([flat, flat.new_zeros(pad)]).view(-1, size)

    def _scaled_blocks(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The value blocks and their scales ``max|v| / 127``."""
        blocks = self._blocks(values.detach().float().reshape(-1))
        return blocks, blocks.abs().amax(dim=1) / 127.0

    def encode(
        self, values: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        blocks, scales = self._scaled_blocks(values)
        scaled = blocks / torch.where(scales > 0, scales, 1.0).unsqueeze(1)
        if self.stochastic:
            codes = torch.floor(scaled + torch.rand(scaled.shape, generator=generator))
        else:
            codes = torch.round(scaled)
        codes = codes.clamp(-127, 127).to(torch.int8).reshape(-1)[: values.numel()]
        return codes.view(values.shape).numpy(), scales.numpy()

    def decode(self, values: np.ndarray, scales: np.ndarray | None = None) -> torch.Tensor:
        if scales is None:
            raise ValueError("int8 values need their scales")
        codes = torch.from_numpy(values.astype(np.float32))
        blocks = self._blocks(codes.reshape(-1)) * torch.from_numpy(scales).float().unsqueeze(1)
        return blocks.reshape(-1)[: codes.numel()].view(codes.shape)

    def error_bound(self, values: torch.Tensor) -> float:
        peak = float(self._scaled_blocks(values)[1].max()) if values.numel() else 0.0
        # fp32 arithmetic in v / s and back adds a few ulps on top of the rounding.
        return peak * (1.0 if self.stochastic else 0.5) * (1 + 1e-5) + 1e-12


CODECS: Registry[type[Codec]] = Registry("compression.quantization", (Fp32, Fp16))
"""What ``compression.quantization`` may name."""
CODECS.register(Int8, name="int8", summary="int8 values, one scale per tensor")
CODECS.register(Int8, name="int8-block", summary="int8 values, one scale per block-size values")


def build_codec(name: str, block_size: int = 256, stochastic: bool = False) -> Codec:
    """The codec ``compression.quantization`` names."""
    if name not in CODECS:
        raise ValueError(f"unknown quantization {name!r}; use one of {', '.join(CODECS)}")
    settings = CompressionConfig(
        quantization=name, block_size=block_size, stochastic_rounding=stochastic
    )
    return CODECS[name].from_config(settings)
