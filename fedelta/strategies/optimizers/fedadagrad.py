"""FedAdagrad: accumulated squared deltas (Reddi et al., 2021)."""

from __future__ import annotations

import torch

from fedelta.strategies.optimizers.fedopt import FedOpt


class FedAdagrad(FedOpt):
    """``v = v + d^2``."""

    name = "fedadagrad"
    fixes = "badly scaled coordinates (adaptive server step, Adagrad)"

    def second_moment(self, v: torch.Tensor, d_sq: torch.Tensor) -> torch.Tensor:
        return v + d_sq
