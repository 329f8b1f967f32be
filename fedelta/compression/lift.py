"""LIFT-style principal weights (Liu et al., 2025, "LIFT the Veil for the Truth:
Principal Weights Emerge after Rank Reduction"): train only the entries that are
largest in magnitude in a rank-``r`` approximation of each weight matrix.

The mask is computed by each client from the global weights it received (so it
follows the federation's model round by round) and sent with the values. Vectors
(biases, norms) use their own magnitudes. A matrix whose approximation is all
zero (a LoRA B factor before its first update) has no principal entries yet; it
gets a random mask from the given generator.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedelta.compression.selection import random_indices
from fedelta.compression.sparse import count_for


def principal_indices(weight: torch.Tensor, density: float, rank: int) -> torch.Tensor | None:
    """Sorted flat indices of the largest entries of the rank-``rank`` approximation
    of ``weight``; ``None`` when that approximation is zero."""
    w = weight.detach().float()
    if w.dim() == 2:
        r = min(rank, *w.shape)
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        w = (u[:, :r] * s[:r]) @ vh[:r]
    score = w.abs().reshape(-1)
    if not bool((score > 0).any()):
        return None
    k = count_for(score.numel(), density)
    return torch.sort(torch.topk(score, k, sorted=False).indices).values


def lift_indices(
    start: Mapping[str, torch.Tensor], density: float, rank: int, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """The principal-weight mask of every tensor in ``start``."""
    out = {}
    for name, weight in start.items():
        indices = principal_indices(weight, density, rank)
        out[name] = (
            indices if indices is not None else random_indices(weight.numel(), density, generator)
        )
    return out
