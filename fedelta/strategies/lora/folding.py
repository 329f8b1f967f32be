"""Exact LoRA aggregation by folding into the base weights: FedEx-LoRA and FLoRA.

Both combine the clients' *weight updates* ``scale_i * (B_i' A_i' - B_i A_i)``
(dense per adapted module, accumulated as replies arrive), let the server
optimizer step the effective update ``W - W0 = fold + scale * B @ A``, then split
the result back into adapter factors and a base-weight correction ``fold``:

* FedEx-LoRA (Singhal et al., 2024) keeps the averaged factors as the next adapter
  and folds the residual ``sum_i w_i scale_i B_i A_i - scale * mean(B) mean(A)``.
* FLoRA (Wang et al., 2024) folds everything (the stacked product of all clients'
  factors, whatever their rank) and starts a fresh adapter each round.

The fold reaches clients dense, or as a rank-``fold-rank`` truncated SVD of the
exact correction; the server keeps the exact correction, so what one round's
truncation leaves out is carried in it and offered again in the next round's
SVD (error feedback), and its relative error is reported as ``fold-error``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence

import torch

from fedelta.lora import (
    A_SUFFIX,
    B_SUFFIX,
    FOLD_PREFIX,
    adapted_modules,
    client_view,
    encode_fold,
    is_factor,
    lift_delta,
    product,
    seeded_lora_A,
)
from fedelta.seeding import derive_seed
from fedelta.strategies.aggregators.mean import Mean
from fedelta.strategies.lora.base import LoraAggregation
from fedelta.tensors import TensorDict

TOTAL_PREFIX = "total/"
"""Optimizer-space keys: the effective update ``W - W0`` of one module."""


class FoldingLora(LoraAggregation, ABC):
    """Aggregates exact weight updates; subclasses choose the next adapter factors."""

    exact = True
    linear = False
    dp_friendly = False
    factor_space = False
    folds_tail = True

    def initial_state(self, adapter_state: Mapping[str, torch.Tensor]) -> TensorDict:
        state = dict(adapter_state)
        for module in adapted_modules(adapter_state):
            b, a = adapter_state[module + B_SUFFIX], adapter_state[module + A_SUFFIX]
            state[FOLD_PREFIX + module] = torch.zeros(b.shape[0], a.shape[1])
        return state

    def downlink(self, global_state: Mapping[str, torch.Tensor]) -> tuple[TensorDict, TensorDict]:
        adapter, _ = super().downlink(global_state)
        folds = {
            k.removeprefix(FOLD_PREFIX): v
            for k, v in global_state.items()
            if k.startswith(FOLD_PREFIX)
        }
        sent, error = encode_fold(folds, self.fold_rank)
        if self.fold_rank:
            self._metrics["fold-error"] = error
        return adapter, sent

    def params(self) -> TensorDict:
        scale = self.scaling.scale()
        params = {
            k: v for k, v in self.global_state.items() if self.exchanged(k) and not is_factor(k)
        }
        for module in adapted_modules(self.global_state):
            params[TOTAL_PREFIX + module] = self.global_state[FOLD_PREFIX + module] + product(
                self.global_state, module, scale
            )
        return params

    def update(self, delta: Mapping[str, torch.Tensor], rank: int) -> TensorDict:
        start, _ = client_view(self.global_state, rank, self.scaling)
        scale = self.scaling.scale(rank)
        result = {k: v for k, v in delta.items() if not is_factor(k)}
        for module in adapted_modules(start):
            b0, a0 = start[module + B_SUFFIX], start[module + A_SUFFIX]
            b1, a1 = b0 + delta[module + B_SUFFIX], a0 + delta[module + A_SUFFIX]
            result[TOTAL_PREFIX + module] = scale * (b1 @ a1 - b0 @ a0)
        return result

    def finish(self, new_params: Mapping[str, torch.Tensor]) -> TensorDict:
        state = {k: v for k, v in new_params.items() if not k.startswith(TOTAL_PREFIX)}
        state = dict(self.global_state) | state | self.next_factors()
        state = self._project(state)
        scale = self.scaling.scale()
        for module in adapted_modules(state):
            state[FOLD_PREFIX + module] = new_params[TOTAL_PREFIX + module] - product(
                state, module, scale
            )
        return state

    @abstractmethod
    def next_factors(self) -> TensorDict:
        """The adapter factors clients start the next round from."""


class FedExLora(FoldingLora):
    """Averaged factors as the next adapter, the exact residual folded into the base."""

    name = "fedex"
    refactorable = True
    summary = "factor means + exact residual folded into the base weights"

    def begin(
        self, server_round: int, global_state: Mapping[str, torch.Tensor], ranks: Sequence[int]
    ) -> None:
        super().begin(server_round, global_state, ranks)
        self._factor_mean = Mean()

    def observe(self, delta: Mapping[str, torch.Tensor], rank: int, weight: float) -> None:
        factors = {k: v for k, v in delta.items() if is_factor(k)}
        self._factor_mean.add(lift_delta(factors, rank, self.scaling), weight)

    def next_factors(self) -> TensorDict:
        mean = self._factor_mean.result()
        return {k: self.global_state[k] + d for k, d in mean.items()}


class FLoraStacking(FoldingLora):
    """All clients' factors stacked (ranks concatenated) and folded; a fresh adapter
    (seeded A for the round, B = 0) each round."""

    name = "flora"
    summary = "stacked factors folded into the base, adapter re-initialised each round"

    def next_factors(self) -> TensorDict:
        seed = derive_seed(self.seed, self.server_round)
        factors: TensorDict = {}
        for module in adapted_modules(self.global_state):
            a, b = self.global_state[module + A_SUFFIX], self.global_state[module + B_SUFFIX]
            factors[module + A_SUFFIX] = seeded_lora_A(seed, module, a.shape[0], a.shape[1])
            factors[module + B_SUFFIX] = torch.zeros_like(b)
        return factors
