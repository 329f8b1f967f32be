"""Aggregation strategies over client deltas, selectable by name in config."""

from fedelta.strategies.base import EmptyRoundError, Strategy
from fedelta.strategies.fedavg import FedAvg

STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (FedAvg,)}
"""Strategy classes by their config name."""


def build_strategy(name: str) -> Strategy:
    """Instantiate the strategy that ``strategy = name`` selects."""
    try:
        return STRATEGIES[name]()
    except KeyError:
        raise ValueError(
            f"unknown strategy {name!r}; known: {', '.join(sorted(STRATEGIES))}"
        ) from None


__all__ = ["STRATEGIES", "EmptyRoundError", "FedAvg", "Strategy", "build_strategy"]
