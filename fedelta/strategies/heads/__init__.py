"""Head strategies for classification (``strategy.head``): how the new head is
initialised and when it trains relative to LoRA. One method per file, its paper in
the module docstring; ``docs/strategies.md`` compares their costs."""

from __future__ import annotations

from fedelta.config import RunConfig
from fedelta.registry import Registry
from fedelta.strategies.heads.base import (
    BODY,
    HEAD,
    JOINT,
    HeadStrategy,
    select,
    select_layout,
    trains,
)
from fedelta.strategies.heads.fedbabu import FedBABU
from fedelta.strategies.heads.joint import Joint
from fedelta.strategies.heads.linear_probe import LinearProbe
from fedelta.strategies.heads.lp_ft import LinearProbeThenFineTune
from fedelta.strategies.heads.ncm import (
    ClassStatistics,
    HeadShapeError,
    NearestClassMean,
    class_feature_sums,
    head_linear,
    ncm_head,
    with_ncm_head,
)

HEADS: Registry[type[HeadStrategy]] = Registry(
    "strategy.head", (Joint, NearestClassMean, LinearProbeThenFineTune, FedBABU, LinearProbe)
)
"""Head strategies by ``strategy.head`` name."""


def build_head(config: RunConfig) -> HeadStrategy:
    """The head strategy ``strategy.head`` names, with the run's round settings."""
    return HEADS[config.strategy.head].from_config(config)


def round_phase(config: RunConfig, server_round: int) -> str:
    """Which tensors train in ``server_round``: :data:`JOINT`, :data:`HEAD` or :data:`BODY`."""
    return build_head(config).phase(server_round)


__all__ = [
    "BODY",
    "HEAD",
    "HEADS",
    "JOINT",
    "ClassStatistics",
    "FedBABU",
    "HeadShapeError",
    "HeadStrategy",
    "Joint",
    "LinearProbe",
    "LinearProbeThenFineTune",
    "NearestClassMean",
    "build_head",
    "class_feature_sums",
    "head_linear",
    "ncm_head",
    "round_phase",
    "select",
    "select_layout",
    "trains",
    "with_ncm_head",
]
