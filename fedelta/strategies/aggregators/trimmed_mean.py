"""Coordinate-wise trimmed mean of the client updates (Yin et al., 2018)."""

from __future__ import annotations

import math

from fedelta.config import RunConfig
from fedelta.strategies.aggregators.base import BufferedAggregator
from fedelta.tensors import TensorDict


class TrimmedMean(BufferedAggregator):
    """Per coordinate, drop the ``floor(beta * n)`` largest and smallest values and
    average the rest (unweighted)."""

    name = "trimmed-mean"
    summary = "coordinate-wise mean without the trim-fraction largest and smallest"

    def __init__(self, trim_fraction: float = 0.1) -> None:
        super().__init__()
        if not 0 <= trim_fraction < 0.5:
            raise ValueError(f"trim fraction must be in [0, 0.5), got {trim_fraction}")
        self.trim_fraction = trim_fraction

    @classmethod
    def from_config(cls, config: RunConfig) -> TrimmedMean:
        return cls(config.strategy.trim_fraction)

    def combine(self) -> TensorDict:
        n = len(self.updates)
        cut = math.floor(self.trim_fraction * n)
        result: TensorDict = {}
        for k in self.updates[0]:
            ordered = self.stacked(k).sort(dim=0).values
            result[k] = ordered[cut : n - cut].mean(dim=0)
        return result
