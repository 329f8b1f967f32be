"""The example-weighted mean, streamed into fp64 accumulators (FedAvg's rule)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedelta.strategies.aggregators.base import Aggregator, TensorDict
from fedelta.strategies.base import EmptyRoundError


class Mean(Aggregator):
    """sum_i n_i u_i / sum_i n_i, independent of the order replies arrive in."""

    name = "mean"
    summary = "example-weighted mean (FedAvg's rule)"
    streaming = True
    linear = True

    def __init__(self) -> None:
        self._sum: TensorDict = {}
        self._weight = 0.0

    def begin(self) -> None:
        self._sum, self._weight = {}, 0.0

    def add(self, update: Mapping[str, torch.Tensor], weight: float) -> None:
        if weight <= 0:
            raise ValueError(f"update weight must be positive, got {weight}")
        for k, v in update.items():
            acc = self._sum.get(k)
            if acc is None:
                self._sum[k] = v.to(torch.float64) * weight
            else:
                acc.add_(v, alpha=weight)
        self._weight += weight

    def result(self) -> TensorDict:
        if self._weight == 0:
            raise EmptyRoundError("no client update was accumulated this round")
        return {k: (acc / self._weight).to(torch.float32) for k, acc in self._sum.items()}
