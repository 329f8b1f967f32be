"""Ways to combine one round's client updates: the mean, robust rules, merge operators."""

from fedelta.strategies.aggregators.base import Aggregator, BufferedAggregator
from fedelta.strategies.aggregators.krum import Krum, MultiKrum
from fedelta.strategies.aggregators.mean import Mean
from fedelta.strategies.aggregators.median import Median
from fedelta.strategies.aggregators.merge import MergeAggregator
from fedelta.strategies.aggregators.trimmed_mean import TrimmedMean

AGGREGATORS: dict[str, type[Aggregator]] = {
    cls.name: cls for cls in (Mean, Median, TrimmedMean, Krum, MultiKrum)
}

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
