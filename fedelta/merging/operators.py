"""Merge operators over task vectors (deltas): task arithmetic, TIES, DARE, magnitude.

The arithmetic is peft's (``peft.utils.merge_utils``), called as it is, so a merge
here equals peft's on the same inputs. fedelta adds what a federation needs
around it: DARE's random drops come from a seeded generator instead of the
global one (the same seed gives the same merge in every process), and a registry
that says how each operator uses density and weights.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from peft.utils import merge_utils


@dataclass(frozen=True)
class MergeMethod:
    name: str
    summary: str
    uses_density: bool
    disjoint: bool
    """Averages over the inputs that agree with the elected sign (TIES): weights act
    as per-input scales, not as shares of a sum."""
    function: Callable[..., torch.Tensor]


MERGE_METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in (
        MergeMethod(
            "task-arithmetic",
            "weighted sum",
            False,
            False,
            merge_utils.task_arithmetic,
        ),
        MergeMethod(
            "magnitude-prune",
            "keep each input's largest entries, weighted sum",
            True,
            False,
            merge_utils.magnitude_prune,
        ),
        MergeMethod(
            "ties",
            "trim to density, elect sign, mean of the agreeing entries",
            True,
            True,
            merge_utils.ties,
        ),
        MergeMethod(
            "dare-linear",
            "drop entries with probability 1 - density, rescale, weighted sum",
            True,
            False,
            merge_utils.dare_linear,
        ),
        MergeMethod(
            "dare-ties",
            "DARE drops and rescaling, then TIES sign election and disjoint mean",
            True,
            True,
            merge_utils.dare_ties,
        ),
    )
}
"""Merge operators by name."""


def merge_tensors(
    method: str,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    density: float = 1.0,
    seed: int = 0,
) -> torch.Tensor:
    """Merge same-shaped ``tensors`` with ``weights`` as peft's operator ``method`` does.

    ``density`` is the share of entries kept (ignored by task arithmetic; 1 keeps
    all). DARE's drops come from ``seed``: the first input's mask is drawn first.
    """
    spec = MERGE_METHODS[method]
    if not tensors:
        raise ValueError("nothing to merge")
    if len(weights) != len(tensors):
        raise ValueError(f"{len(weights)} weights for {len(tensors)} tensors")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    shape = tensors[0].shape
    for i, t in enumerate(tensors):
        if t.shape != shape:
            raise ValueError(f"input {i} has shape {tuple(t.shape)}, input 0 {tuple(shape)}")
    inputs = [t.detach().float() for t in tensors]
    w = torch.tensor([float(x) for x in weights], dtype=torch.float32)
    if not spec.uses_density:
        return spec.function(inputs, w)
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        # density 1 keeps everything; peft says so with a warning on every tensor.
        warnings.filterwarnings("ignore", message="The density")
        torch.manual_seed(seed)
        return spec.function(inputs, w, density)
