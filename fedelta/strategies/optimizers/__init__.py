"""Server optimizers applied to the aggregated delta, by config name."""

from fedelta.registry import Registry
from fedelta.strategies.optimizers.base import ServerOptimizer
from fedelta.strategies.optimizers.fedadagrad import FedAdagrad
from fedelta.strategies.optimizers.fedadam import FedAdam
from fedelta.strategies.optimizers.fedavg import FedAvg
from fedelta.strategies.optimizers.fedavgm import FedAvgM
from fedelta.strategies.optimizers.fedopt import FedOpt
from fedelta.strategies.optimizers.fedprox import PROXIMAL_MU, FedProx
from fedelta.strategies.optimizers.fedyogi import FedYogi

OPTIMIZERS: Registry[type[ServerOptimizer]] = Registry(
    "strategy.optimizer", (FedAvg, FedAvgM, FedAdam, FedYogi, FedAdagrad, FedProx)
)

__all__ = [
    "OPTIMIZERS",
    "PROXIMAL_MU",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedOpt",
    "FedProx",
    "FedYogi",
    "ServerOptimizer",
]
