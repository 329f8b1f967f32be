"""Coordinate-wise median of the client updates (Yin et al., 2018)."""

from __future__ import annotations

from fedelta.strategies.aggregators.base import BufferedAggregator
from fedelta.tensors import TensorDict


class Median(BufferedAggregator):
    """Each coordinate takes the median over clients (unweighted; mean of the two
    middle values for an even count), so fewer than half of the clients cannot
    move it arbitrarily far."""

    name = "median"
    summary = "coordinate-wise median"

    def combine(self) -> TensorDict:
        n = len(self.updates)
        result: TensorDict = {}
        for k in self.updates[0]:
            ordered = self.stacked(k).sort(dim=0).values
            result[k] = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
        return result
