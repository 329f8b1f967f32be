"""Model merging as the aggregator: TIES, DARE and magnitude pruning across clients.

Client updates from different data pull some coordinates in opposite directions;
the mean lets them cancel. A merge operator (:mod:`fedelta.merging.operators`,
peft's arithmetic) replaces the mean: TIES keeps each client's largest entries,
elects a sign per coordinate and averages only the clients that agree; DARE drops
entries at random and rescales; magnitude pruning keeps each client's largest
entries. The result goes to the server optimizer like the mean would.

What is merged is what the LoRA rule aggregates: the factor deltas under naive,
FFA and FedSA rules (merging factors, not their products: linear operators
commute with FFA's fixed A, the others do not), and the exact per-module weight
updates ``scale * (B'A' - BA)`` under FedEx-LoRA and FLoRA, which materialise
each client's full matrix and fold the merged result into the base weights.

Weights: sum-type merges take example shares (summing to 1, so the result is a
weighted mean); TIES-type merges take example counts relative to their mean (1
for equal clients), since they already average over the agreeing clients.
"""

from __future__ import annotations

import hashlib

from fedelta.config import RunConfig
from fedelta.merging.operators import MERGE_METHODS, merge_tensors
from fedelta.seeding import derive_seed
from fedelta.strategies.aggregators.base import BufferedAggregator
from fedelta.tensors import TensorDict


class MergeAggregator(BufferedAggregator):
    """Combines one round's updates with a merge operator instead of the mean."""

    name = "merge"
    summary = "model merging across clients"

    def __init__(self, method: str, density: float, seed: int = 0) -> None:
        super().__init__()
        if method not in MERGE_METHODS:
            raise ValueError(f"unknown merge method {method!r}; one of {sorted(MERGE_METHODS)}")
        self.method = MERGE_METHODS[method]
        self.name = method
        self.density = density
        self.seed = seed
        self.server_round = 0

    @classmethod
    def from_config(cls, config: RunConfig) -> MergeAggregator:
        """The merge ``strategy.aggregator`` names (this class is registered under each
        merge operator's name)."""
        s = config.strategy
        return cls(s.aggregator, s.merge_density, config.seed)

    def begin(self, server_round: int = 0) -> None:
        super().begin(server_round)
        self.server_round = server_round

    def combine(self) -> TensorDict:
        # Replies arrive in any order; random drops must not depend on it.
        order = sorted(range(len(self.updates)), key=lambda i: _fingerprint(self.updates[i]))
        updates = [self.updates[i] for i in order]
        counts = [self.weights[i] for i in order]
        total = sum(counts)
        if self.method.disjoint:
            weights = [c * len(counts) / total for c in counts]
        else:
            weights = [c / total for c in counts]
        return {
            key: merge_tensors(
                self.method.name,
                [u[key] for u in updates],
                weights,
                self.density,
                derive_seed(self.seed, self.server_round, index),
            )
            for index, key in enumerate(sorted(updates[0]))
        }


def _fingerprint(update: TensorDict) -> str:
    digest = hashlib.sha256()
    for key in sorted(update):
        digest.update(update[key].numpy().tobytes())
    return digest.hexdigest()
