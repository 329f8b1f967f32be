"""How one round's client updates are combined into one aggregated delta.

The mean folds each update into fp64 accumulators as it arrives (memory does not
grow with the number of clients). Robust rules need to see all updates at once
(an order statistic or pairwise distances), so they buffer them: memory grows
linearly with the clients of a round, which their capability entry states.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from fedelta.config import RunConfig
from fedelta.strategies.base import EmptyRoundError
from fedelta.tensors import TensorDict

SITE_WEIGHT = "site-weight"
"""Strategy config key: the weight every site's upload counts for, when the aggregator
fixes it; a site multiplies its securely aggregated upload by it instead of its
example count."""


class Aggregator(ABC):
    """Combines weighted client updates of identical layout."""

    name: ClassVar[str]
    summary: ClassVar[str]
    streaming: ClassVar[bool] = False
    linear: ClassVar[bool] = False
    """Only the (weighted) sum of updates is needed, so secure aggregation can hide them."""
    sparse: ClassVar[bool] = False
    """Takes :class:`~fedelta.tensors.SparseTensor` updates without densifying them."""
    weighs_senders: ClassVar[bool] = False
    """Can average each coordinate over the clients that sent it
    (``compression.weighting = "senders"``)."""
    site_weight: ClassVar[float | None] = None
    """The weight of every site's update whatever its example count; ``None`` weighs
    each by its examples."""

    @classmethod
    def from_config(cls, config: RunConfig) -> Aggregator:
        """The rule with a run's settings; rules without settings take none."""
        return cls()

    @abstractmethod
    def begin(self, server_round: int = 0) -> None:
        """Forget the previous round; ``server_round`` is the one starting."""

    @abstractmethod
    def add(self, update: Mapping[str, torch.Tensor], weight: float) -> None:
        """Take one client's update with its weight (number of examples)."""

    @abstractmethod
    def result(self) -> TensorDict:
        """The combined update; raises :class:`EmptyRoundError` when nothing was added."""

    def weight(self, num_examples: int) -> float:
        """What a reply of ``num_examples`` examples weighs: :attr:`site_weight`, or the
        example count."""
        return float(num_examples if self.site_weight is None else self.site_weight)

    def metrics(self) -> dict[str, float]:
        return {}

    def sampling(self, sampled: int, population: int) -> None:
        """Told, before :meth:`begin`, that ``sampled`` of ``population`` sites were asked
        this round (client-level DP accounts and scales its noise with it)."""
        return None

    def client_config(self) -> dict[str, bool | int | float | str]:
        """Settings sent to the sampled clients this round."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """JSON-able values to checkpoint (a privacy accountant); most keep none."""
        return {}

    def load_state_dict(self, meta: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        return None


class BufferedAggregator(Aggregator):
    """Keeps every update of the round; subclasses combine the stacked tensors."""

    def __init__(self) -> None:
        self.updates: list[TensorDict] = []
        self.weights: list[float] = []

    def begin(self, server_round: int = 0) -> None:
        self.updates, self.weights = [], []

    def add(self, update: Mapping[str, torch.Tensor], weight: float) -> None:
        self.updates.append({k: v.detach().float().clone() for k, v in update.items()})
        self.weights.append(float(weight))

    def result(self) -> TensorDict:
        if not self.updates:
            raise EmptyRoundError("no client update was accumulated this round")
        return self.combine()

    @abstractmethod
    def combine(self) -> TensorDict:
        """Combine ``self.updates`` (at least one)."""

    def stacked(self, key: str) -> torch.Tensor:
        """The updates of one tensor stacked on a new first axis."""
        return torch.stack([u[key] for u in self.updates])
