"""Server optimizers: how the aggregated delta moves the global parameters.

Following Reddi et al. ("Adaptive Federated Optimization", ICLR 2021), the
aggregated client delta is a pseudo-gradient and the server takes one optimizer
step with it per round. Parameters and moments are kept in fp32; moments are
checkpointed so a resumed run continues the same trajectory.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import ClassVar

import torch

from fedelta.config import RunConfig
from fedelta.tensors import TensorDict


class ServerOptimizer(ABC):
    """One step per round from the aggregated delta."""

    name: ClassVar[str]
    default_lr: ClassVar[float] = 1.0
    client_loss_term: ClassVar[str] = ""
    """What clients add to their training loss for this optimizer (FedProx's proximal
    term); empty when they train on the task loss alone."""

    def __init__(self, lr: float | None = None) -> None:
        self.lr = self.default_lr if not lr else lr

    @classmethod
    def from_config(cls, config: RunConfig) -> ServerOptimizer:
        """The optimizer with a run's ``[strategy]`` settings (``server-lr`` 0: the
        optimizer's default)."""
        return cls(lr=config.strategy.server_lr or None)

    @abstractmethod
    def step(
        self, params: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]
    ) -> TensorDict:
        """The parameters after applying the aggregated ``delta``."""

    def client_config(self) -> dict[str, bool | int | float | str]:
        """What clients must know to train for this optimizer (FedProx's mu)."""
        return {}

    def state_dict(self) -> TensorDict:
        return {}

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor]) -> None:
        return None
