"""The example-weighted mean, streamed into fp64 accumulators (FedAvg's rule), for
dense and sparse client updates alike.

A sparse update is scatter-added into the same dense accumulators (only its
entries are touched), so server memory is one accumulator per tensor whatever
the number of clients. Per coordinate ``c``, with client weights ``n_i``:

* ``weighting="all"`` (default): ``sum_i n_i u_i[c] / sum_i n_i`` over every client
  of the round, a client that did not send ``c`` counting as zero. This is exactly
  the mean of the densified updates, and linear (secure aggregation works).
* ``weighting="senders"``: ``sum_i n_i u_i[c] / sum_{i sent c} n_i``, the mean over
  the clients that sent ``c`` (0 where nobody did). Coordinates few clients touch
  are not shrunk towards zero, at the price of weighting coordinates unequally.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedelta.config import RunConfig
from fedelta.strategies.aggregators.base import Aggregator
from fedelta.strategies.base import EmptyRoundError
from fedelta.tensors import SparseTensor, TensorDict

WEIGHTINGS = ("all", "senders")


class Mean(Aggregator):
    """Example-weighted mean, independent of the order replies arrive in."""

    name = "mean"
    summary = "example-weighted mean (FedAvg's rule)"
    streaming = True
    linear = True
    sparse = True
    weighs_senders = True

    def __init__(self, weighting: str = "all") -> None:
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        self.weighting = weighting
        self._sum: TensorDict = {}
        self._coverage: TensorDict = {}
        self._weight = 0.0

    @classmethod
    def from_config(cls, config: RunConfig) -> Mean:
        return cls(config.compression.weighting)

    def begin(self, server_round: int = 0) -> None:
        self._sum, self._coverage, self._weight = {}, {}, 0.0

    def add(self, update: Mapping[str, torch.Tensor | SparseTensor], weight: float) -> None:
        if weight <= 0:
            raise ValueError(f"update weight must be positive, got {weight}")
        for k, v in update.items():
            shape = v.shape if isinstance(v, SparseTensor) else tuple(v.shape)
            acc = self._sum.get(k)
            if acc is None:
                acc = self._sum[k] = torch.zeros(shape, dtype=torch.float64)
            if isinstance(v, SparseTensor):
                acc.view(-1).index_add_(0, v.indices, v.values.to(torch.float64), alpha=weight)
            else:
                acc.add_(v, alpha=weight)
            if self.weighting == "senders":
                cover = self._coverage.get(k)
                if cover is None:
                    cover = self._coverage[k] = torch.zeros(shape, dtype=torch.float64)
                if isinstance(v, SparseTensor):
                    cover.view(-1)[v.indices] += weight
                else:
                    cover.add_(weight)
        self._weight += weight

    def result(self) -> TensorDict:
        if self._weight == 0:
            raise EmptyRoundError("no client update was accumulated this round")
        if self.weighting == "all":
            return {k: (acc / self._weight).to(torch.float32) for k, acc in self._sum.items()}
        return {
            k: torch.where(
                self._coverage[k] > 0, acc / self._coverage[k].clamp_min(1e-300), 0.0
            ).to(torch.float32)
            for k, acc in self._sum.items()
        }
