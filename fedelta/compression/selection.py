"""Which entries of a delta a client sends: top-k by magnitude, or a seeded random mask.

Both keep ``count_for(numel, density)`` entries of every tensor. Top-k picks the
largest magnitudes of the (error-corrected) delta, so its indices travel with it.
A seeded mask is drawn from a generator seeded by the run seed, the round and the
tensor's name: every client and the server draw the same indices, none are sent,
and the sum of the clients' uploads is a plain sum (secure aggregation works).
"""

from __future__ import annotations

import zlib

import torch

from fedelta.compression.sparse import count_for
from fedelta.seeding import derive_seed


def top_k_indices(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Sorted flat indices of the ``density`` share of largest-magnitude entries."""
    flat = tensor.detach().reshape(-1)
    k = count_for(flat.numel(), density)
    return torch.sort(torch.topk(flat.abs(), k, sorted=False).indices).values


def random_indices(numel: int, density: float, generator: torch.Generator) -> torch.Tensor:
    """Sorted flat indices of ``density`` of ``numel`` entries, drawn from ``generator``."""
    k = count_for(numel, density)
    return torch.sort(torch.randperm(numel, generator=generator)[:k]).values


def seeded_mask_indices(
    seed: int, server_round: int, name: str, numel: int, density: float
) -> torch.Tensor:
    """Sorted flat indices of round ``server_round``'s shared random mask for ``name``."""
    generator = torch.Generator().manual_seed(
        derive_seed(seed, server_round, zlib.crc32(name.encode()))
    )
    return random_indices(numel, density, generator)
