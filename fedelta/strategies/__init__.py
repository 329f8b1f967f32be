"""Aggregation strategies over client deltas, usable from Python and by name in config.

A built-in strategy is a :class:`DeltaStrategy`: a LoRA aggregation rule
(``strategy.lora``), optional norm bounding (``strategy.clip-norm``), an aggregator
(``strategy.aggregator``) and a server optimizer (``strategy.optimizer``), each
picked from its registry; :func:`fedelta.build.build_strategy` makes it from a
config. Anything implementing :class:`Strategy` can replace it.
"""

from __future__ import annotations

from fedelta.strategies.aggregators import AGGREGATORS, Aggregator
from fedelta.strategies.base import Capabilities, EmptyRoundError, Strategy
from fedelta.strategies.delta_strategy import DeltaStrategy
from fedelta.strategies.lora import LORA_AGGREGATIONS, LoraAggregation
from fedelta.strategies.optimizers import OPTIMIZERS, ServerOptimizer

__all__ = [
    "AGGREGATORS",
    "LORA_AGGREGATIONS",
    "OPTIMIZERS",
    "Aggregator",
    "Capabilities",
    "DeltaStrategy",
    "EmptyRoundError",
    "LoraAggregation",
    "ServerOptimizer",
    "Strategy",
]
