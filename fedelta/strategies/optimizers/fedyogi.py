"""FedYogi: additive, sign-controlled second moment (Reddi et al., 2021)."""

from __future__ import annotations

import torch

from fedelta.strategies.optimizers.fedopt import FedOpt


class FedYogi(FedOpt):
    """``v = v - (1 - beta2) * d^2 * sign(v - d^2)``: v grows slowly, never explodes."""

    name = "fedyogi"
    fixes = "badly scaled coordinates (adaptive server step, Yogi)"

    def second_moment(self, v: torch.Tensor, d_sq: torch.Tensor) -> torch.Tensor:
        return v - (1 - self.beta2) * d_sq * torch.sign(v - d_sq)
