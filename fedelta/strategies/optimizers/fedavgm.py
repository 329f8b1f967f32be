"""FedAvgM: server momentum on the aggregated delta (Hsu et al., 2019)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedelta.config import RunConfig
from fedelta.strategies.optimizers.base import ServerOptimizer
from fedelta.tensors import TensorDict


class FedAvgM(ServerOptimizer):
    """``v = momentum * v + delta``; ``x += lr * v``. Damps round-to-round swings."""

    name = "fedavgm"
    fixes = "round-to-round swings (server momentum)"

    def __init__(self, lr: float | None = None, momentum: float = 0.9) -> None:
        super().__init__(lr)
        self.momentum = momentum
        self.velocity: TensorDict = {}

    @classmethod
    def from_config(cls, config: RunConfig) -> FedAvgM:
        return cls(lr=config.strategy.server_lr or None, momentum=config.strategy.momentum)

    def step(
        self, params: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]
    ) -> TensorDict:
        for k, d in delta.items():
            v = self.velocity.get(k)
            self.velocity[k] = d.clone() if v is None else self.momentum * v + d
        return {k: params[k] + self.lr * self.velocity[k] for k in params}

    def state_dict(self) -> TensorDict:
        return {f"velocity/{k}": v for k, v in self.velocity.items()}

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.velocity = {
            k.removeprefix("velocity/"): v.clone()
            for k, v in tensors.items()
            if k.startswith("velocity/")
        }
