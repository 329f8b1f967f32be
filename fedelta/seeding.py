"""Seeds: one derivation rule for every random draw a run makes, and one way to seed a step.

Every process of a federation (server, each site, the in-process engine) derives
the seed of a draw from the run seed and the draw's coordinates (round, site,
purpose), so the same config gives the same run wherever it executes.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def derive_seed(*parts: int) -> int:
    """A stable seed for (run seed, round, client, ...) that differs for every tuple."""
    seed = 0
    for part in parts:
        seed = (seed * 1_000_003 + int(part)) % (2**63 - 1)
    return seed


def seed_everything(seed: int) -> None:
    """Seed every RNG a training step touches, so a round is reproducible."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
