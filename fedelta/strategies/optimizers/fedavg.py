"""FedAvg: global += server_lr * mean delta (McMahan et al., 2017)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedelta.strategies.optimizers.base import ServerOptimizer
from fedelta.tensors import TensorDict


class FedAvg(ServerOptimizer):
    """The aggregated delta applied as it is (server learning rate 1 by default)."""

    name = "fedavg"
    fixes = "baseline: the weighted mean delta is the server step"

    def step(
        self, params: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]
    ) -> TensorDict:
        return {k: params[k] + self.lr * delta[k] for k in params}
