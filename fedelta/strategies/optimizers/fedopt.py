"""Adaptive server optimizers (Reddi et al., 2021, Algorithm 2), sharing one loop.

With delta ``d`` and per-coordinate moments (no bias correction, as published):
``m = beta1 * m + (1 - beta1) * d``; ``v`` updated by the subclass rule;
``x += lr * m / (sqrt(v) + tau)``. ``v`` starts at ``tau**2`` (the paper's
``v_{-1} >= tau^2``), ``m`` at zero.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping

import torch

from fedelta.config import RunConfig
from fedelta.strategies.optimizers.base import ServerOptimizer
from fedelta.tensors import TensorDict


class FedOpt(ServerOptimizer):
    """Adam-family server step; subclasses define the second-moment update."""

    default_lr = 1e-2

    def __init__(
        self,
        lr: float | None = None,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
    ) -> None:
        super().__init__(lr)
        self.beta1, self.beta2, self.tau = beta1, beta2, tau
        self.m: TensorDict = {}
        self.v: TensorDict = {}

    @classmethod
    def from_config(cls, config: RunConfig) -> FedOpt:
        settings = config.strategy
        return cls(
            lr=settings.server_lr or None,
            beta1=settings.beta1,
            beta2=settings.beta2,
            tau=settings.tau,
        )

    @abstractmethod
    def second_moment(self, v: torch.Tensor, d_sq: torch.Tensor) -> torch.Tensor:
        """The new ``v`` from the previous one and the squared delta."""

    def step(
        self, params: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]
    ) -> TensorDict:
        new: TensorDict = {}
        for k, x in params.items():
            d = delta[k].float()
            m = self.m.get(k, torch.zeros_like(d))
            v = self.v.get(k, torch.full_like(d, self.tau**2))
            m = self.beta1 * m + (1 - self.beta1) * d
            v = self.second_moment(v, d * d)
            self.m[k], self.v[k] = m, v
            new[k] = x + self.lr * m / (v.sqrt() + self.tau)
        return new

    def state_dict(self) -> TensorDict:
        return {f"m/{k}": t for k, t in self.m.items()} | {f"v/{k}": t for k, t in self.v.items()}

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.m = {k[2:]: t.clone() for k, t in tensors.items() if k.startswith("m/")}
        self.v = {k[2:]: t.clone() for k, t in tensors.items() if k.startswith("v/")}
