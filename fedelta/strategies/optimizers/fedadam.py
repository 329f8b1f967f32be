"""FedAdam: exponential average of squared deltas (Reddi et al., 2021)."""

from __future__ import annotations

import torch

from fedelta.strategies.optimizers.fedopt import FedOpt


class FedAdam(FedOpt):
    """``v = beta2 * v + (1 - beta2) * d^2``."""

    name = "fedadam"
    fixes = "badly scaled coordinates (adaptive server step, Adam)"

    def second_moment(self, v: torch.Tensor, d_sq: torch.Tensor) -> torch.Tensor:
        return self.beta2 * v + (1 - self.beta2) * d_sq
