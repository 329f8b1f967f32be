"""Where differential-privacy noise comes from.

Noise anyone can regenerate protects nothing: with the run seed in the config,
every site could subtract seeded noise from the global model. By default the
generators are seeded from the operating system's entropy; ``privacy.seeded-noise``
derives them from the run seed instead, for experiments that must repeat exactly.
"""

from __future__ import annotations

import secrets

import torch

from fedelta.seeding import derive_seed


def noise_generator(seeded: bool, *seed_parts: int) -> torch.Generator:
    """A CPU generator for one use of a Gaussian mechanism (a round, a site)."""
    seed = derive_seed(*seed_parts) if seeded else secrets.randbits(63)
    return torch.Generator().manual_seed(seed)
