"""The build layer: a run's components made from its config.

Each component builds itself from the config (``from_config``) and declares what
it can do as flags; this module only picks the registered component each key
names and puts them together. What may be combined with what is checked by
:func:`fedelta.compatibility.check_config`, which asks the same components.
"""

from __future__ import annotations

from fedelta.config import RunConfig
from fedelta.models import ModelSpec
from fedelta.strategies import (
    AGGREGATORS,
    LORA_AGGREGATIONS,
    OPTIMIZERS,
    Aggregator,
    DeltaStrategy,
    LoraAggregation,
    ServerOptimizer,
)
from fedelta.strategies.aggregators.client_dp import ClientLevelDP


def build_optimizer(config: RunConfig) -> ServerOptimizer:
    """The server optimizer ``strategy.optimizer`` selects, with its settings."""
    return OPTIMIZERS[config.strategy.optimizer].from_config(config)


def build_aggregator(config: RunConfig) -> Aggregator:
    """The aggregator ``strategy.aggregator`` selects; client-level DP replaces
    it (it is the mean of clipped updates plus noise)."""
    if config.privacy.client_dp != "none":
        return ClientLevelDP.from_config(config)
    return AGGREGATORS[config.strategy.aggregator].from_config(config)


def build_lora_aggregation(config: RunConfig) -> LoraAggregation:
    """The LoRA rule ``strategy.lora`` selects, bound to the run's rank scaling."""
    return LORA_AGGREGATIONS[config.strategy.lora].from_config(config)


def build_strategy(config: RunConfig) -> DeltaStrategy:
    """The strategy a run config's ``[strategy]`` (and ``[privacy]``) tables describe."""
    return DeltaStrategy(
        build_lora_aggregation(config),
        optimizer=build_optimizer(config),
        aggregator=build_aggregator(config),
        clip_norm=config.strategy.clip_norm,
    )


def model_spec(config: RunConfig, num_labels: int, rank: int | None = None) -> ModelSpec:
    """The model a run config asks for, with a head of ``num_labels`` outputs and LoRA
    rank ``rank`` (default ``lora.r``, the global rank); A is frozen where the LoRA
    rule says so."""
    return ModelSpec(
        name=config.model.name,
        num_labels=num_labels,
        lora_r=rank or config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=tuple(config.lora.target_module_list()),
        seed=config.seed,
        global_rank=config.lora.r,
        use_rslora=config.lora.use_rslora,
        freeze_lora_a=LORA_AGGREGATIONS[config.strategy.lora].freezes_a,
        finetuning=config.model.finetuning,
        task=config.model.task,
        pooling=config.model.pooling,
    )
