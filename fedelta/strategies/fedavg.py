"""FedAvg over deltas: global += weighted mean of client deltas (McMahan et al., 2017)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedelta.strategies.base import EmptyRoundError, Strategy, TensorDict


class FedAvg(Strategy):
    """Example-weighted mean of the deltas, applied with server learning rate 1.

    Exact for any trainable state that is linear in what clients send (full
    weights, classifier heads); on LoRA factors it averages A and B separately.
    The sum is kept in one fp64 accumulator per tensor, whatever the client count,
    so the result does not depend on the order in which replies arrive.
    """

    name = "fedavg"

    def __init__(self) -> None:
        self._sum: TensorDict = {}
        self._weight = 0.0

    def begin_round(self, global_state: Mapping[str, torch.Tensor]) -> None:
        self._sum = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in global_state.items()}
        self._weight = 0.0

    def accumulate(self, delta: Mapping[str, torch.Tensor], num_examples: int) -> None:
        if num_examples <= 0:
            raise ValueError(f"num-examples must be positive, got {num_examples}")
        for name, acc in self._sum.items():
            acc.add_(delta[name], alpha=float(num_examples))
        self._weight += num_examples

    def mean_delta(self) -> TensorDict:
        """The example-weighted mean of this round's deltas."""
        if self._weight == 0:
            raise EmptyRoundError("no client update was accumulated this round")
        return {name: (acc / self._weight).to(torch.float32) for name, acc in self._sum.items()}

    def finish_round(self, global_state: Mapping[str, torch.Tensor]) -> TensorDict:
        mean = self.mean_delta()
        return {name: global_state[name] + mean[name] for name in global_state}
