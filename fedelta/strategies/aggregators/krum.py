"""Krum and Multi-Krum: keep the updates closest to their neighbours (Blanchard et al., 2017)."""

from __future__ import annotations

import torch

from fedelta.config import RunConfig
from fedelta.strategies.aggregators.base import BufferedAggregator
from fedelta.tensors import TensorDict


class Krum(BufferedAggregator):
    """Score each update by the summed squared distance to its ``n - f - 2`` nearest
    others; return the best-scored update (Krum), or the example-weighted mean of the
    ``keep`` best (Multi-Krum, ``keep > 1``)."""

    name = "krum"
    summary = "the single most central update"

    def __init__(self, byzantine: int = 1, keep: int = 1) -> None:
        super().__init__()
        self.byzantine, self.keep = byzantine, keep
        self._selected: list[int] = []

    @classmethod
    def from_config(cls, config: RunConfig) -> Krum:
        return cls(config.strategy.byzantine)

    def scores(self) -> torch.Tensor:
        """Krum score of every buffered update (lower is more central)."""
        flat = torch.stack(
            [torch.cat([u[k].flatten().double() for k in sorted(u)]) for u in self.updates]
        )
        distances = torch.cdist(flat, flat).pow(2)
        n = len(self.updates)
        neighbours = max(1, n - self.byzantine - 2)
        distances.fill_diagonal_(float("inf"))
        nearest = distances.sort(dim=1).values[:, : min(neighbours, n - 1)]
        return nearest.sum(dim=1) if n > 1 else torch.zeros(1, dtype=torch.float64)

    def combine(self) -> TensorDict:
        n = len(self.updates)
        keep = min(self._keep(n), n)
        order = torch.argsort(self.scores(), stable=True)[:keep].tolist()
        self._selected = sorted(order)
        total = sum(self.weights[i] for i in order)
        return {
            k: sum(self.updates[i][k] * (self.weights[i] / total) for i in order)
            for k in self.updates[0]
        }

    def _keep(self, n: int) -> int:
        return self.keep

    def metrics(self) -> dict[str, float]:
        return {"krum-selected": float(len(self._selected))}


class MultiKrum(Krum):
    """Multi-Krum: average the ``keep`` best-scored updates (``keep = 0``: ``n - f``)."""

    name = "multi-krum"
    summary = "example-weighted mean of the krum-keep most central updates"

    def __init__(self, byzantine: int = 1, keep: int = 0) -> None:
        super().__init__(byzantine, keep)

    @classmethod
    def from_config(cls, config: RunConfig) -> MultiKrum:
        return cls(config.strategy.byzantine, config.strategy.krum_keep)

    def _keep(self, n: int) -> int:
        return self.keep or max(1, n - self.byzantine)
