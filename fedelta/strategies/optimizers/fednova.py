"""FedNova: normalised averaging for unequal local step counts.

Wang, Liu, Liang, Joshi and Poor, "Tackling the Objective Inconsistency Problem in
Heterogeneous Federated Optimization", NeurIPS 2020.

A site that takes more local steps moves further, and plain averaging then drifts
towards the objective of the sites that train longest. FedNova averages each
site's update *per local step* and scales the average back by an effective step
count. With ``p_i`` the reply weights (example counts, normalised), ``tau_i`` the
local optimizer steps a site reports (``train-steps``) and ``Delta_i`` its delta::

    d = sum_i p_i Delta_i / tau_i        tau_eff = sum_i p_i tau_i
    x <- x + server_lr * tau_eff * d

This is the paper's vanilla-SGD case (``a_i = tau_i``, the sum of the local step
weights of plain SGD). Clients training with AdamW (the default) are normalised the
same way, which is then a heuristic. Both sums stream: each reply is divided by its
step count as it arrives, and ``sum p_i tau_i`` is kept alongside.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedelta.errors import InvalidUpdateError
from fedelta.strategies.optimizers.fedavg import FedAvg
from fedelta.tensors import Delta, Layout, TensorDict


class FedNova(FedAvg):
    """FedAvg over per-step updates, rescaled by the weighted mean step count.

    Parameters
    ----------
    lr
        Server learning rate (default 1).
    """

    name = "fednova"
    reads_each_reply = "FedNova divides each reply's delta by its own local step count"
    uses_step_counts = True
    fixes = "objective inconsistency from unequal local step counts (normalised averaging)"

    def __init__(self, lr: float | None = None) -> None:
        super().__init__(lr)
        self._weight = 0.0
        self._weighted_steps = 0.0

    def begin_round(self, server_round: int, layout: Layout, population: int) -> None:
        self._weight = self._weighted_steps = 0.0

    def normalise(self, update: Delta, weight: float, steps: int | None) -> Delta:
        """``update / steps``; the reply's weight and steps go into ``tau_eff``.

        Raises
        ------
        InvalidUpdateError
            If the reply did not report a positive step count.
        """
        if steps is None or steps <= 0:
            raise InvalidUpdateError(f"FedNova needs a positive train-steps, got {steps!r}")
        self._weight += weight
        self._weighted_steps += weight * steps
        return self.scaled(update, 1.0 / steps)

    @property
    def effective_steps(self) -> float:
        """``tau_eff = sum_i p_i tau_i`` over the replies of the round so far."""
        return self._weighted_steps / self._weight if self._weight else 0.0

    def step(
        self, params: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]
    ) -> TensorDict:
        """``x + lr * tau_eff * d``, ``delta`` being the aggregated per-step update ``d``."""
        scale = self.lr * self.effective_steps
        return {k: params[k] + scale * delta[k] for k in params}
