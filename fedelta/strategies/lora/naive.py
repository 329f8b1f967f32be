"""``naive``: A and B averaged separately, the common baseline (inexact)."""

from __future__ import annotations

from fedelta.strategies.lora.base import LoraAggregation


class NaiveLora(LoraAggregation):
    """Averages A and B on their own. The result is not the average of the updates:
    mean(B_i) mean(A_i) != mean(B_i A_i). Lower-rank clients train on the first
    components only; the rest of the global adapter is missing from their view."""

    name = "naive"
    summary = "A and B averaged separately (inexact baseline)"
    exact = False
    linear = True
    dp_friendly = False
    needs_adapter = False
    refactorable = True
