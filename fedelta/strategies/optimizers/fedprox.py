"""FedProx: FedAvg on the server, a proximal term on the clients (Li et al., 2020)."""

from __future__ import annotations

from fedelta.config import RunConfig
from fedelta.strategies.optimizers.fedavg import FedAvg

PROXIMAL_MU = "proximal-mu"
"""Client-config key: clients add (mu/2) * ||w - w_global||^2 to their loss."""


class FedProx(FedAvg):
    """Limits client drift on heterogeneous data by pulling local weights to the global."""

    name = "fedprox"
    fixes = "client drift (proximal term pulls local weights to the global)"
    client_loss_term = "FedProx's proximal term"

    def __init__(self, lr: float | None = None, mu: float = 0.01) -> None:
        super().__init__(lr)
        self.mu = mu

    @classmethod
    def from_config(cls, config: RunConfig) -> FedProx:
        return cls(lr=config.strategy.server_lr or None, mu=config.strategy.proximal_mu)

    def client_config(self) -> dict[str, bool | int | float | str]:
        return {PROXIMAL_MU: self.mu}
