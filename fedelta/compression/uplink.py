"""One run's uplink compression, as clients apply it and the server reads it back.

Built from the ``[compression]`` table on both sides, so a reply is decoded
against exactly what the run promised: which tensors (Half Fine-Tuning sends
half), dense or sparse with how many entries, whose indices (sent, or derived
from the round seed), and in which value codec.

Client side, per round: Half Fine-Tuning picks the tensors that train; a
training-time mask (SpIEL, LIFT) restricts the coordinates that train; after
training, top-k or the seeded mask pick the entries to send (error-corrected),
the codec quantizes them, and the residual keeps whatever the server will not
see. Server side: :meth:`UplinkCompression.decode` validates and decodes.

The classification head is never sparsified and always trains in full: it starts
from random weights, and at 2 labels it is 770 values; a head trained or sent 5%
at a time keeps the whole federation at the majority class for rounds (as the
first compression benchmark runs showed). Only its values are quantized.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict

from fedelta.compression.error_feedback import corrected, remainder
from fedelta.compression.half_finetuning import selected_tensors
from fedelta.compression.lift import lift_indices
from fedelta.compression.masked_training import TrainingMask
from fedelta.compression.quantization import build_codec
from fedelta.compression.selection import seeded_mask_indices, top_k_indices
from fedelta.compression.sparse import SPARSITY, count_for
from fedelta.compression.spiel import SpielMask, initial_indices
from fedelta.compression.wire import TensorFormat, decode_delta, encode_delta, format_of
from fedelta.config import CompressionConfig
from fedelta.seeding import derive_seed
from fedelta.tensors import Delta, SparseTensor, TensorDict, densify, is_head


@dataclass
class ClientMemory:
    """What a site keeps across rounds for compression (in its ``Context.state``)."""

    residual: TensorDict = field(default_factory=dict)
    """Error feedback: the part of past deltas not yet sent."""
    indices: TensorDict = field(default_factory=dict)
    """SpIEL: the site's current index set per tensor."""

    RESIDUAL: ClassVar[str] = "compression-residual"
    INDICES: ClassVar[str] = "compression-indices"

    @classmethod
    def load(cls, state: RecordDict) -> ClientMemory:
        """The memory a node's ``Context.state`` holds (empty on its first round)."""

        def read(key: str) -> TensorDict:
            record = state.array_records.get(key)
            if record is None:
                return {}
            return {k: torch.from_numpy(a.numpy().copy()) for k, a in record.items()}

        return cls(read(cls.RESIDUAL), read(cls.INDICES))

    def save(self, state: RecordDict) -> None:
        """Write the memory into a node's ``Context.state``."""
        for key, tensors in ((self.RESIDUAL, self.residual), (self.INDICES, self.indices)):
            if tensors:
                record = ArrayRecord()
                for name, tensor in tensors.items():
                    record[name] = Array(np.ascontiguousarray(tensor.numpy()))
                state[key] = record


class UplinkCompression:
    """The ``[compression]`` settings of a run, bound to its seed."""

    def __init__(self, settings: CompressionConfig, seed: int) -> None:
        self.settings = settings
        self.seed = seed
        self.codec = build_codec(
            settings.quantization, settings.block_size, settings.stochastic_rounding
        )
        self.method = SPARSITY[settings.sparsity]
        self._masks: dict[tuple[int, str, int], torch.Tensor] = {}

    @property
    def sparsity(self) -> str:
        return self.settings.sparsity

    @property
    def sends_indices(self) -> bool:
        return self.method.sends_indices

    @property
    def uses_error_feedback(self) -> bool:
        """Error feedback applies where something is left out: post-hoc sparsity or a
        lossy codec, never training-time masks (they send all they trained)."""
        lossy = self.method.sparse or not self.codec.exact
        return self.settings.error_feedback and lossy and not self.method.trains_mask

    # -- shared --------------------------------------------------------------------------
    def uplink_names(self, names: Iterable[str], server_round: int) -> set[str]:
        """The tensors trained and sent this round (half of them under Half Fine-Tuning)."""
        names = list(names)
        if self.settings.half_finetuning:
            return selected_tensors(names, self.seed, server_round)
        return set(names)

    def formats(
        self, layout: Mapping[str, tuple[int, ...]], server_round: int
    ) -> dict[str, TensorFormat]:
        """What a valid reply holds, per tensor, for a client whose tensors have ``layout``."""
        formats = {}
        for name in sorted(self.uplink_names(layout, server_round)):
            shape = tuple(layout[name])
            fmt = TensorFormat(shape)
            if self.method.sparse and not is_head(name):
                count = count_for(fmt.numel, self.settings.density)
                indices = None
                if self.sparsity == "random-mask":
                    indices = self._seeded_mask(server_round, name, fmt.numel)
                fmt = TensorFormat(shape, count, indices)
            formats[name] = fmt
        return formats

    def _seeded_mask(self, server_round: int, name: str, numel: int) -> torch.Tensor:
        key = (server_round, name, numel)
        if key not in self._masks:
            self._masks = {k: v for k, v in self._masks.items() if k[0] == server_round}
            self._masks[key] = seeded_mask_indices(
                self.seed, server_round, name, numel, self.settings.density
            )
        return self._masks[key]

    # -- server ----------------------------------------------------------------------------
    def decode(
        self, record: ArrayRecord, layout: Mapping[str, tuple[int, ...]], server_round: int
    ) -> Delta:
        """A client's reply decoded and validated (raises ``InvalidUpdateError``)."""
        return decode_delta(record, self.formats(layout, server_round), self.codec)

    # -- client ----------------------------------------------------------------------------
    def training_mask(
        self,
        start: Mapping[str, torch.Tensor],
        memory: ClientMemory,
        server_round: int,
        client_seed: int,
    ) -> TrainingMask | None:
        """The mask local training must respect this round (SpIEL, LIFT), if any."""
        generator = torch.Generator().manual_seed(derive_seed(client_seed, server_round, 11))
        s = self.settings
        start = {k: v for k, v in start.items() if not is_head(k)}
        if self.sparsity == "spiel":
            layout = {k: tuple(v.shape) for k, v in start.items()}
            indices = initial_indices(layout, s.density, generator)
            for name, kept in memory.indices.items():
                if name in indices and kept.shape == indices[name].shape:
                    indices[name] = kept
            return SpielMask(indices, start, s.regrow_interval, s.regrow_fraction)
        if self.sparsity == "lift":
            return TrainingMask(lift_indices(start, s.density, s.lift_rank, generator), start)
        return None

    def compress(
        self,
        delta: Mapping[str, torch.Tensor],
        memory: ClientMemory,
        server_round: int,
        client_seed: int,
        mask: TrainingMask | None = None,
    ) -> ArrayRecord:
        """The wire form of ``delta`` (the tensors :meth:`uplink_names` selected);
        updates ``memory`` (residual, SpIEL indices)."""
        generator = torch.Generator().manual_seed(derive_seed(client_seed, server_round, 13))
        density = self.settings.density
        intended = dict(delta)
        if self.uses_error_feedback:
            intended = corrected(delta, memory.residual)
        wire: dict[str, torch.Tensor | SparseTensor] = dict(intended)
        for name, value in intended.items():
            if is_head(name):
                continue
            if mask is not None:
                wire[name] = SparseTensor.gather(value, mask.indices[name])
            elif self.sparsity == "top-k":
                wire[name] = SparseTensor.gather(value, top_k_indices(value, density))
            elif self.sparsity == "random-mask":
                indices = self._seeded_mask(server_round, name, value.numel())
                wire[name] = SparseTensor.gather(value, indices)
        if mask is not None and self.sparsity == "spiel":
            memory.indices = dict(mask.indices)
        record = encode_delta(wire, self.codec, self.sends_indices, generator)
        if self.uses_error_feedback:
            formats = {k: format_of(v, self.sends_indices) for k, v in wire.items()}
            sent = densify(decode_delta(record, formats, self.codec))
            memory.residual = remainder(intended, sent, memory.residual)
        return record
