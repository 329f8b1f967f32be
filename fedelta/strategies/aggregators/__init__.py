"""Ways to combine one round's client updates: the mean, robust rules, merge operators."""

from fedelta.merging import AGGREGATION_MERGES, MERGE_METHODS
from fedelta.registry import Registry
from fedelta.strategies.aggregators.base import Aggregator, BufferedAggregator
from fedelta.strategies.aggregators.krum import Krum, MultiKrum
from fedelta.strategies.aggregators.mean import Mean
from fedelta.strategies.aggregators.median import Median
from fedelta.strategies.aggregators.merge import MergeAggregator
from fedelta.strategies.aggregators.trimmed_mean import TrimmedMean

AGGREGATORS: Registry[type[Aggregator]] = Registry(
    "strategy.aggregator", (Mean, Median, TrimmedMean, Krum, MultiKrum)
)
"""What ``strategy.aggregator`` may name: the mean, robust rules and the merge operators
that can replace the mean over one round's updates."""
for _merge in AGGREGATION_MERGES:
    AGGREGATORS.register(MergeAggregator, name=_merge, summary=MERGE_METHODS[_merge].summary)


__all__ = [
    "AGGREGATORS",
    "Aggregator",
    "BufferedAggregator",
    "Krum",
    "Mean",
    "Median",
    "MergeAggregator",
    "MultiKrum",
    "TrimmedMean",
]
