"""Model merging: operators over task vectors, LiNeS, merges across rounds, transfer."""

from fedelta.merging.operators import MERGE_METHODS, MergeMethod, merge_tensors

AGGREGATION_MERGES = ("ties", "dare-ties", "dare-linear", "magnitude-prune")
"""Merge operators that can replace the mean over one round's client updates
(task arithmetic with example weights *is* the mean)."""
EXPORT_MERGES = ("none", *MERGE_METHODS, "ema", "lines")
"""What ``export.merge`` may be."""

__all__ = ["AGGREGATION_MERGES", "EXPORT_MERGES", "MERGE_METHODS", "MergeMethod", "merge_tensors"]
