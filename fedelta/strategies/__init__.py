"""Aggregation strategies over client deltas, usable from Python and by name in config.

A built-in strategy is a :class:`DeltaStrategy`: a LoRA aggregation rule
(``strategy.lora``), optional norm bounding (``strategy.clip-norm``), a combination
rule (``strategy.robust``) and a server optimizer (``strategy.name``). Anything
implementing :class:`Strategy` can replace it.
"""

from __future__ import annotations

from fedelta.config import RunConfig
from fedelta.lora import RankScaling
from fedelta.merging import AGGREGATION_MERGES
from fedelta.strategies.aggregators import (
    AGGREGATORS,
    Aggregator,
    Krum,
    Mean,
    MergeAggregator,
    MultiKrum,
    TrimmedMean,
)
from fedelta.strategies.base import Capabilities, EmptyRoundError, Strategy
from fedelta.strategies.delta_strategy import DeltaStrategy
from fedelta.strategies.lora import LORA_AGGREGATIONS, LoraAggregation
from fedelta.strategies.optimizers import (
    OPTIMIZERS,
    FedAvgM,
    FedOpt,
    FedProx,
    ServerOptimizer,
)


def build_optimizer(config: RunConfig) -> ServerOptimizer:
    """The server optimizer ``strategy.name`` selects, with its settings."""
    s = config.strategy
    cls = OPTIMIZERS[s.name]
    lr = s.server_lr or None
    if issubclass(cls, FedOpt):
        return cls(lr=lr, beta1=s.beta1, beta2=s.beta2, tau=s.tau)
    if cls is FedAvgM:
        return FedAvgM(lr=lr, momentum=s.momentum)
    if cls is FedProx:
        return FedProx(lr=lr, mu=s.proximal_mu)
    return cls(lr=lr)


def build_aggregator(config: RunConfig) -> Aggregator:
    """The combination rule ``strategy.robust`` selects."""
    s = config.strategy
    if config.privacy.client_dp != "none":
        from fedelta.strategies.aggregators.client_dp import ClientLevelDP

        return ClientLevelDP(config.privacy, config.num_server_rounds, config.seed)
    if s.robust in AGGREGATION_MERGES:
        return MergeAggregator(s.robust, s.merge_density, config.seed)
    cls = AGGREGATORS[s.robust]
    if cls is TrimmedMean:
        return TrimmedMean(s.trim_fraction)
    if cls is MultiKrum:
        return MultiKrum(s.byzantine, s.krum_keep)
    if cls is Krum:
        return Krum(s.byzantine)
    if cls is Mean:
        return Mean(config.compression.weighting)
    return cls()


def build_lora_aggregation(config: RunConfig) -> LoraAggregation:
    """The LoRA rule ``strategy.lora`` selects, bound to the run's rank scaling."""
    return LORA_AGGREGATIONS[config.strategy.lora](
        rank_scaling(config),
        seed=config.seed,
        fold_rank=config.strategy.fold_rank,
        svd_projection=config.strategy.rank_projection == "svd",
    )


def rank_scaling(config: RunConfig) -> RankScaling:
    return RankScaling(config.lora.r, config.lora.alpha, config.lora.use_rslora)


def build_strategy(config: RunConfig) -> DeltaStrategy:
    """The strategy a run config's ``[strategy]`` table describes."""
    return DeltaStrategy(
        build_lora_aggregation(config),
        optimizer=build_optimizer(config),
        aggregator=build_aggregator(config),
        clip_norm=config.strategy.clip_norm,
    )


__all__ = [
    "AGGREGATORS",
    "LORA_AGGREGATIONS",
    "OPTIMIZERS",
    "Capabilities",
    "DeltaStrategy",
    "EmptyRoundError",
    "Strategy",
    "build_aggregator",
    "build_lora_aggregation",
    "build_optimizer",
    "build_strategy",
    "rank_scaling",
]
