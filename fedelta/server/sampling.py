"""Seeded client sampling by site name, reproducible across runs and resumes.

Flower node ids are random per run, so sampling over them would not repeat. The
server samples over the sorted site names instead, with its own RNG whose state
is checkpointed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def sample_size(available: int, fraction: float, minimum: int) -> int:
    """How many of ``available`` clients a round asks: the fraction, at least ``minimum``."""
    return min(available, max(minimum, math.ceil(fraction * available)))


def sample_sites(
    rng: np.random.Generator, sites: Sequence[str], fraction: float, minimum: int
) -> list[str]:
    """``max(minimum, ceil(fraction * n))`` distinct sites (all of them if fewer), sorted."""
    ordered = sorted(sites)
    count = sample_size(len(ordered), fraction, minimum)
    if count == len(ordered):
        return ordered
    picked = rng.choice(len(ordered), size=count, replace=False)
    return [ordered[i] for i in sorted(picked)]
