"""How LoRA factors from clients become the global adapter: the shared machinery.

A LoRA aggregation decides three things: which adapter tensors travel (FFA-LoRA
never sends A, FedSA-LoRA keeps B on the client), the space in which client
updates are combined (the factors themselves, or the exact weight updates
``scale * B @ A``), and how the combined update becomes the next global state.
Factor-space rules (``naive``, ``ffa``, ``fedsa``) are implemented here; the
folding rules (``fedex``, ``flora``) in :mod:`.folding`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch

from fedelta.config import RunConfig
from fedelta.lora import (
    A_SUFFIX,
    B_SUFFIX,
    FOLD_PREFIX,
    RankScaling,
    adapted_modules,
    client_view,
    lift_delta,
    product,
    svd_factors,
)
from fedelta.tensors import TensorDict


class LoraAggregation:
    """Factor-space aggregation; subclasses set which tensors travel and the guarantees."""

    name: ClassVar[str]
    summary: ClassVar[str]
    exact: ClassVar[bool]
    linear: ClassVar[bool]
    dp_friendly: ClassVar[bool]
    heterogeneous_ranks: ClassVar[bool] = True
    freezes_a: ClassVar[bool] = False
    """Clients never train A (it stays the seeded initialisation)."""
    local_b: ClassVar[bool] = False
    """Clients keep B to themselves across rounds (personalisation)."""
    factor_space: ClassVar[bool] = True
    """Client deltas are combined as factors (sparse deltas stay sparse at the global
    rank); folding rules combine weight updates instead."""
    folds_tail: ClassVar[bool] = False
    """A lower-rank client folds the global components it cannot hold into its base
    weights, so it trains on exactly the global model."""
    needs_adapter: ClassVar[bool] = True
    """Works on LoRA factors only, so the model must train an adapter
    (``model.finetuning = "lora"``); a rule that averages any tensors does not."""
    refactorable: ClassVar[bool] = False
    """Both factors stay global and trained, so the server may store them in SVD
    order (``strategy.rank-projection = "svd"``)."""

    def __init__(
        self,
        scaling: RankScaling,
        seed: int = 0,
        fold_rank: int = 0,
        svd_projection: bool = False,
    ) -> None:
        self.scaling = scaling
        self.seed = seed
        self.fold_rank = fold_rank
        self.svd_projection = svd_projection
        self.server_round = 0
        self.global_state: Mapping[str, torch.Tensor] = {}
        self._metrics: dict[str, float] = {}

    @classmethod
    def from_config(cls, config: RunConfig) -> LoraAggregation:
        """The rule with a run's rank scaling, seed and ``[strategy]`` settings."""
        return cls(
            RankScaling.from_settings(config.lora),
            seed=config.seed,
            fold_rank=config.strategy.fold_rank,
            svd_projection=config.strategy.rank_projection == "svd",
        )

    # -- what travels ---------------------------------------------------------------
    def exchanged(self, name: str) -> bool:
        """Whether the adapter tensor ``name`` is sent to and from clients."""
        if name.startswith(FOLD_PREFIX):
            return False
        if self.freezes_a and name.endswith(A_SUFFIX):
            return False
        return not (self.local_b and name.endswith(B_SUFFIX))

    def initial_state(self, adapter_state: Mapping[str, torch.Tensor]) -> TensorDict:
        return dict(adapter_state)

    def downlink(self, global_state: Mapping[str, torch.Tensor]) -> tuple[TensorDict, TensorDict]:
        return {k: v for k, v in global_state.items() if self.exchanged(k)}, {}

    # -- one round ------------------------------------------------------------------
    def begin(
        self, server_round: int, global_state: Mapping[str, torch.Tensor], ranks: Sequence[int]
    ) -> None:
        self.server_round = server_round
        self.global_state = global_state
        self._metrics = {}
        lower = [r for r in ranks if r < self.scaling.global_rank]
        if lower and not self.local_b:
            errors = [self._tail_share(r) for r in lower]
            self._metrics["rank-projection-error"] = sum(errors) / len(ranks)

    def params(self) -> TensorDict:
        """The tensors the server optimizer steps this round."""
        return {k: v for k, v in self.global_state.items() if self.exchanged(k)}

    def update(self, delta: Mapping[str, torch.Tensor], rank: int) -> TensorDict:
        """One client's delta in the space of :meth:`params`."""
        return lift_delta(delta, rank, self.scaling)

    def observe(self, delta: Mapping[str, torch.Tensor], rank: int, weight: float) -> None:
        """See a client's raw delta (for rules that keep side statistics)."""
        return None

    def finish(self, new_params: Mapping[str, torch.Tensor]) -> TensorDict:
        """The next global state from the optimizer's output."""
        state = dict(self.global_state) | dict(new_params)
        return self._project(state)

    def metrics(self) -> dict[str, float]:
        return dict(self._metrics)

    # -- helpers --------------------------------------------------------------------
    def _project(self, state: TensorDict) -> TensorDict:
        """With ``svd`` projection, store each module's factors in SVD order."""
        if not self.svd_projection:
            return state
        for module in adapted_modules(state):
            b, a = svd_factors(state[module + B_SUFFIX], state[module + A_SUFFIX])
            state[module + B_SUFFIX], state[module + A_SUFFIX] = b, a
        return state

    def _tail_share(self, rank: int) -> float:
        """Share (Frobenius) of the global LoRA update outside a rank-``rank`` view."""
        _, tail = client_view(self.global_state, rank, self.scaling)
        tail_sq = sum(float(t.pow(2).sum()) for t in tail.values())
        total_sq = sum(
            float(product(self.global_state, m, self.scaling.scale()).pow(2).sum()) for m in tail
        )
        return (tail_sq / total_sq) ** 0.5 if total_sq > 0 else 0.0
