"""The strategy interface: how client deltas become the next global state.

A strategy sees one round at a time: :meth:`Strategy.begin_round`, then
:meth:`Strategy.accumulate` for each reply *as it arrives* (so server memory does
not grow with the number of clients), then :meth:`Strategy.finish_round`, which
returns the new global state. Whatever a strategy carries across rounds (server
optimizer moments, for instance) lives in :meth:`state_dict` so that checkpoints
and ``--resume`` restore it exactly.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

TensorDict = dict[str, torch.Tensor]


class EmptyRoundError(RuntimeError):
    """A round ended with no usable update; averaging over nothing is refused."""


class Strategy(ABC):
    """Aggregates client deltas of a trainable state into a new global state."""

    name: ClassVar[str]
    """The name that selects this strategy in config (``strategy = "..."``)."""

    def client_config(self, server_round: int) -> dict[str, bool | int | float | str]:
        """Extra settings sent to clients this round (e.g. a proximal term)."""
        return {}

    @abstractmethod
    def begin_round(self, global_state: Mapping[str, torch.Tensor]) -> None:
        """Prepare empty accumulators shaped like ``global_state``."""

    @abstractmethod
    def accumulate(self, delta: Mapping[str, torch.Tensor], num_examples: int) -> None:
        """Fold one validated client delta into the accumulators."""

    @abstractmethod
    def finish_round(self, global_state: Mapping[str, torch.Tensor]) -> TensorDict:
        """The next global state; raises :class:`EmptyRoundError` if nothing arrived."""

    def state_dict(self) -> tuple[TensorDict, dict[str, Any]]:
        """Tensors and JSON-able values to checkpoint; stateless strategies keep none."""
        return {}, {}

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        return None
