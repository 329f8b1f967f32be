"""SpIEL-style sparse fine-tuning (Ansell et al., 2024, "Scaling Sparse Fine-Tuning to
Large Language Models"): train a fixed number of coordinates directly and, every
few steps, prune the ones that moved least and regrow as many where the
accumulated gradient is largest (SpIEL-AG).

A site's index set starts as a seeded random set of ``density`` of each tensor's
entries and is kept across rounds in the node's state, so the federation keeps
refining it; the indices travel with the values, since sites' sets differ.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from fedelta.compression.masked_training import TrainingMask
from fedelta.compression.selection import random_indices


def initial_indices(
    layout: Mapping[str, tuple[int, ...]], density: float, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """A random index set of ``density`` per tensor (a site's first round)."""
    return {
        name: random_indices(math.prod(shape), density, generator) for name, shape in layout.items()
    }


class SpielMask(TrainingMask):
    """A fixed-size index set with periodic prune-and-regrow."""

    def __init__(
        self,
        indices: Mapping[str, torch.Tensor],
        start: Mapping[str, torch.Tensor],
        regrow_interval: int,
        regrow_fraction: float,
    ) -> None:
        super().__init__(indices, start)
        self.regrow_interval = regrow_interval
        self.regrow_fraction = regrow_fraction
        self._grad_sum: dict[str, torch.Tensor] = {}
        self.swapped = 0

    def observe_gradient(self, name: str, grad: torch.Tensor) -> None:
        acc = self._grad_sum.get(name)
        self._grad_sum[name] = grad.detach().abs().float() if acc is None else acc.add_(grad.abs())

    def maybe_update(self, params: Mapping[str, torch.nn.Parameter]) -> None:
        if not self.regrow_interval or self.steps % self.regrow_interval:
            return
        with torch.no_grad():
            for name, active in list(self.indices.items()):
                grad = self._grad_sum.get(name)
                if grad is None:
                    continue
                n_swap = int(self.regrow_fraction * len(active))
                if n_swap == 0:
                    continue
                moved = (params[name].detach().float() - self.start[name].float()).reshape(-1)
                # Prune: the active entries that moved least go back to their start.
                drop = active[torch.topk(moved[active].abs(), n_swap, largest=False).indices]
                flat_param = params[name].data.view(-1)
                flat_param[drop] = self.start[name].reshape(-1)[drop].to(flat_param.dtype)
                # Regrow: the inactive entries with the largest accumulated gradient.
                score = grad.reshape(-1).clone()
                score[active] = -1.0
                grow = torch.topk(score, n_swap).indices
                keep = active[~torch.isin(active, drop)]
                self.set_indices(name, torch.cat([keep, grow]))
                self.swapped += n_swap
        self._grad_sum = {}
