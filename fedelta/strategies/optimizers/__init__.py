"""Server optimizers applied to the aggregated delta, by config name."""

from fedelta.registry import Registry
from fedelta.strategies.optimizers.base import ServerOptimizer
from fedelta.strategies.optimizers.fedadagrad import FedAdagrad
from fedelta.strategies.optimizers.fedadam import FedAdam
from fedelta.strategies.optimizers.fedavg import FedAvg
from fedelta.strategies.optimizers.fedavgm import FedAvgM
from fedelta.strategies.optimizers.fednova import FedNova
from fedelta.strategies.optimizers.fedopt import FedOpt
from fedelta.strategies.optimizers.fedprox import PROXIMAL_MU, FedProx
from fedelta.strategies.optimizers.fedyogi import FedYogi
from fedelta.strategies.optimizers.scaffold import (
    ControlVariateCorrection,
    ControlVariates,
    Scaffold,
    control_variate_change,
)

OPTIMIZERS: Registry[type[ServerOptimizer]] = Registry(
    "strategy.optimizer",
    (FedAvg, FedAvgM, FedAdam, FedYogi, FedAdagrad, FedProx, Scaffold, FedNova),
)

__all__ = [
    "OPTIMIZERS",
    "PROXIMAL_MU",
    "ControlVariateCorrection",
    "ControlVariates",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedNova",
    "FedOpt",
    "FedProx",
    "FedYogi",
    "Scaffold",
    "ServerOptimizer",
    "control_variate_change",
]
