"""What a strategy carries between rounds and across a resume, what it sends and
expects back, and how the run config's LoRA settings reach the LoRA rule."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytest
import torch

from fedelta.build import build_strategy
from fedelta.config import RunConfig
from fedelta.lora import A_SUFFIX, B_SUFFIX, FOLD_PREFIX, RankScaling, decode_fold
from fedelta.strategies import Capabilities, DeltaStrategy, Strategy
from fedelta.strategies.aggregators import Mean
from fedelta.strategies.lora import NaiveLora
from fedelta.strategies.optimizers import FedAdam, FedAvgM, FedYogi, ServerOptimizer

A, B = "m" + A_SUFFIX, "m" + B_SUFFIX


def run_round(strategy: Strategy, state, updates, server_round: int = 1):
    strategy.begin_round(server_round, state)
    for delta, n in updates:
        strategy.accumulate(delta, n)
    return strategy.finish_round(state)


def config(**overrides: Any) -> RunConfig:
    return RunConfig().replace(**overrides)


# -- the base interface a custom strategy inherits ---------------------------------------
class _LastReply(Strategy):
    """The smallest custom strategy: the next state is the last reply added to the state."""

    capabilities = Capabilities(False, False, True, False, True)

    def begin_round(self, server_round, global_state, ranks=(), population=None) -> None:
        self.last: Mapping[str, torch.Tensor] = {}

    def accumulate(self, delta, num_examples, rank=None) -> None:
        self.last = delta

    def finish_round(self, global_state):
        return {k: v + self.last[k] for k, v in global_state.items()}


def test_a_custom_strategy_sends_the_whole_state_and_no_fold() -> None:
    adapter = {A: torch.ones(2, 3), B: torch.zeros(4, 2)}
    strategy = _LastReply()
    state = strategy.initial_state(adapter)
    assert state == adapter and state is not adapter
    sent, folds = strategy.downlink(state)
    assert sent == state and sent is not state and folds == {}
    assert strategy.uplink_layout({A: (2, 3)}, rank=1) == {A: (2, 3)}
    assert strategy.state_dict() == ({}, {})


# -- what a client of a given rank must send back ----------------------------------------
@pytest.mark.parametrize(
    ("lora", "expected_full", "expected_rank_2"),
    [
        ("ffa", {B: (5, 4), "head": (2,)}, {B: (5, 2), "head": (2,)}),
        (
            "fedex",
            {A: (4, 3), B: (5, 4), "head": (2,)},
            {A: (2, 3), B: (5, 2), "head": (2,)},
        ),
    ],
)
def test_uplink_layout_keeps_exchanged_tensors_at_the_clients_rank(
    lora: str, expected_full: dict, expected_rank_2: dict
) -> None:
    """FFA never uploads A, nobody uploads the server's fold; factors take the client's
    rank, the global rank when none is given."""
    layout = {A: (4, 3), B: (5, 4), "head": (2,), FOLD_PREFIX + "m": (5, 3)}
    strategy = build_strategy(config(**{"lora.r": 4, "strategy.lora": lora}))
    assert strategy.uplink_layout(layout) == expected_full
    assert strategy.uplink_layout(layout, rank=2) == expected_rank_2


# -- server optimizer state across a resume ----------------------------------------------
@pytest.mark.parametrize(
    "make", [FedAdam, FedYogi, lambda: FedAvgM(lr=0.5, momentum=0.6)], ids=["adam", "yogi", "m"]
)
def test_a_resumed_optimizer_continues_the_uninterrupted_trajectory(make) -> None:
    deltas = [{"x": torch.tensor([0.1, -0.3]), "y": torch.tensor([1.0])}] * 2 + [
        {"x": torch.tensor([-0.4, 0.1]), "y": torch.tensor([-2.0])}
    ]
    start = {"x": torch.zeros(2), "y": torch.ones(1)}

    def plain(optimizer: ServerOptimizer) -> DeltaStrategy:
        return DeltaStrategy(NaiveLora(RankScaling(8, 16)), optimizer)

    straight, state = plain(make()), start
    for d in deltas:
        state = run_round(straight, state, [(d, 1)])
    first, resumed = plain(make()), start
    for d in deltas[:2]:
        resumed = run_round(first, resumed, [(d, 1)])
    tensors, meta = first.state_dict()
    second = plain(make())
    second.load_state_dict(tensors, meta)
    resumed = run_round(second, resumed, [(deltas[2], 1)])
    for k in state:
        assert torch.equal(state[k], resumed[k]), k
    # The checkpoint is a copy: stepping on does not rewrite what was saved.
    before = {k: v.clone() for k, v in tensors.items()}
    run_round(second, resumed, [(deltas[0], 1)])
    assert all(torch.equal(before[k], tensors[k]) for k in before)


# -- aggregator state across a resume ----------------------------------------------------
class _CountingMean(Mean):
    """A mean that counts the rounds it saw, checkpointing nothing until it saw one."""

    name = "counting-mean"

    def __init__(self) -> None:
        super().__init__()
        self.rounds = 0

    def begin(self, server_round: int = 0) -> None:
        super().begin(server_round)
        self.rounds += 1

    def metrics(self) -> dict[str, float]:
        return {"rounds-seen": float(self.rounds)}

    def state_dict(self) -> dict[str, Any]:
        return {"rounds": self.rounds} if self.rounds else {}

    def load_state_dict(self, meta: Mapping[str, Any]) -> None:
        self.rounds = int(meta.get("rounds", 0))


def _counting() -> DeltaStrategy:
    return DeltaStrategy(NaiveLora(RankScaling(8, 16)), aggregator=_CountingMean())


def test_aggregator_state_rides_along_in_the_strategy_checkpoint() -> None:
    fresh = _counting()
    tensors, meta = fresh.state_dict()
    restored = _counting()
    restored.load_state_dict(tensors, meta)  # nothing saved yet: nothing to restore
    assert restored.aggregator.rounds == 0
    state = {"x": torch.zeros(1)}
    for r in (1, 2):
        state = run_round(fresh, state, [({"x": torch.ones(1)}, 1)], r)
    tensors, meta = fresh.state_dict()
    resumed = _counting()
    resumed.load_state_dict(tensors, meta)
    run_round(resumed, state, [({"x": torch.ones(1)}, 1)], 3)
    assert resumed.round_metrics() == {"rounds-seen": 3.0}


def dp_config(**overrides: Any) -> RunConfig:
    return config(
        **{
            "privacy.client-dp": "central",
            "privacy.client-clip-norm": 1.0,
            "privacy.seeded-noise": True,
            **overrides,
        }
    )


def dp_rounds(strategy: DeltaStrategy, rounds: Sequence[int], state=None):
    """Full participation (sample rate 1), one site per round."""
    state = state or {"x": torch.zeros(8)}
    for r in rounds:
        strategy.begin_round(r, state, ranks=(8,), population=1)
        strategy.accumulate({"x": torch.full((8,), 0.1)}, 1)
        state = strategy.finish_round(state)
    return state


def test_derived_client_noise_spends_the_target_epsilon_over_the_configured_rounds() -> None:
    def after_run(rounds: int) -> tuple[float, float]:
        strategy = build_strategy(
            dp_config(**{"privacy.client-target-epsilon": 8.0, "num-server-rounds": rounds})
        )
        dp_rounds(strategy, range(1, rounds + 1))
        metrics = strategy.round_metrics()
        return metrics["client-dp-noise-multiplier"], metrics["client-dp-epsilon"]

    z_short, eps_short = after_run(2)
    z_long, eps_long = after_run(4)
    # Opacus finds the smallest z within 0.01 of the budget.
    assert 7.9 < eps_short <= 8.0 and 7.9 < eps_long <= 8.0
    assert z_long > z_short > 0


def test_seeded_client_noise_follows_the_run_seed() -> None:
    def noised(seed: int) -> torch.Tensor:
        strategy = build_strategy(
            dp_config(**{"seed": seed, "privacy.client-noise-multiplier": 1.0})
        )
        return dp_rounds(strategy, [1])["x"]

    assert torch.equal(noised(1), noised(1))
    assert not torch.equal(noised(1), noised(2))


def test_a_resumed_client_dp_run_continues_its_privacy_accounting() -> None:
    settings = dp_config(**{"privacy.client-target-epsilon": 8.0, "num-server-rounds": 3})
    straight = build_strategy(settings)
    expected = dp_rounds(straight, [1, 2, 3])
    first = build_strategy(settings)
    state = dp_rounds(first, [1, 2])
    tensors, meta = first.state_dict()
    resumed = build_strategy(settings)
    resumed.load_state_dict(tensors, meta)
    assert torch.equal(dp_rounds(resumed, [3], state)["x"], expected["x"])
    assert resumed.round_metrics() == straight.round_metrics()


# -- the run config's LoRA settings reach the LoRA rule ---------------------------------
G = torch.Generator().manual_seed(3)
START = {A: torch.randn(2, 3, generator=G), B: torch.randn(4, 2, generator=G)}
CLIENTS = [
    ({A: 0.1 * torch.randn(2, 3, generator=G), B: 0.1 * torch.randn(4, 2, generator=G)}, 1),
    ({A: 0.1 * torch.randn(2, 3, generator=G), B: 0.1 * torch.randn(4, 2, generator=G)}, 3),
]


@pytest.mark.parametrize(("rslora", "scale"), [(False, 8 / 2), (True, 8 / 2**0.5)])
def test_fedex_from_config_applies_the_exact_mean_of_scaled_client_products(
    rslora: bool, scale: float
) -> None:
    """W - W0 = fold + scale B A must be sum_i w_i scale (B0 + dB_i)(A0 + dA_i), with the
    config's rank, alpha and rsLoRA choice in ``scale``; the adapter is the factor mean."""
    settings = config(
        **{"strategy.lora": "fedex", "lora.r": 2, "lora.alpha": 8, "lora.use-rslora": rslora}
    )
    strategy = build_strategy(settings)
    state = strategy.initial_state(START)
    new = run_round(strategy, state, CLIENTS)
    weights = [0.25, 0.75]
    expected = sum(
        w * scale * (START[B] + d[B]) @ (START[A] + d[A])
        for w, (d, _) in zip(weights, CLIENTS, strict=True)
    )
    effective = new[FOLD_PREFIX + "m"] + scale * new[B] @ new[A]
    torch.testing.assert_close(effective, expected, rtol=1e-5, atol=1e-6)
    for k in (A, B):
        mean = START[k] + sum(w * d[k] for w, (d, _) in zip(weights, CLIENTS, strict=True))
        torch.testing.assert_close(new[k], mean)


def test_flora_fresh_adapter_follows_the_run_seed() -> None:
    def next_a(seed: int) -> torch.Tensor:
        strategy = build_strategy(config(**{"strategy.lora": "flora", "lora.r": 2, "seed": seed}))
        new = run_round(strategy, strategy.initial_state(START), CLIENTS)
        assert torch.equal(new[B], torch.zeros(4, 2))
        return new[A]

    assert torch.equal(next_a(5), next_a(5))
    assert not torch.equal(next_a(5), next_a(6))


def test_fold_rank_from_config_sends_a_truncated_fold() -> None:
    """fold-rank = 1 sends the best rank-1 approximation of the fold; here the fold has
    singular values 3 and 1, so the relative error is 1 / sqrt(10)."""
    fold = torch.zeros(4, 3)
    fold[0, 0], fold[1, 1] = 3.0, 1.0
    state = {**START, FOLD_PREFIX + "m": fold}
    strategy = build_strategy(config(**{"strategy.lora": "fedex", "strategy.fold-rank": 1}))
    strategy.begin_round(1, state)
    adapter, sent = strategy.downlink(state)
    assert adapter.keys() == {A, B}
    assert {k: tuple(v.shape) for k, v in sent.items()} == {"m.U": (4, 1), "m.V": (1, 3)}
    best = torch.zeros(4, 3)
    best[0, 0] = 3.0
    torch.testing.assert_close(decode_fold(sent)["m"], best)
    assert strategy.lora.metrics()["fold-error"] == pytest.approx(10**-0.5)
    dense = build_strategy(config(**{"strategy.lora": "fedex"}))
    assert torch.equal(dense.downlink(state)[1]["m"], fold)


def test_svd_rank_projection_from_config_stores_factors_in_singular_order() -> None:
    """With ``svd`` the next factors are B = U sqrt(S), A = sqrt(S) V^T of the same product
    (so B^T B = A A^T = diag(S), descending); ``truncate`` keeps the factor mean as is."""
    weights = [0.25, 0.75]
    mean = {
        k: START[k] + sum(w * d[k] for w, (d, _) in zip(weights, CLIENTS, strict=True))
        for k in (A, B)
    }
    kept = build_strategy(config(**{"lora.r": 2, "strategy.rank-projection": "truncate"}))
    new = run_round(kept, START, CLIENTS)
    for k in (A, B):
        torch.testing.assert_close(new[k], mean[k])
    svd = build_strategy(config(**{"lora.r": 2, "strategy.rank-projection": "svd"}))
    new = run_round(svd, START, CLIENTS)
    torch.testing.assert_close(new[B] @ new[A], mean[B] @ mean[A], rtol=1e-5, atol=1e-6)
    gram_b, gram_a = new[B].T @ new[B], new[A] @ new[A].T
    s = torch.linalg.svdvals(mean[B] @ mean[A])[:2]
    torch.testing.assert_close(gram_b, torch.diag(s), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gram_a, torch.diag(s), rtol=1e-4, atol=1e-5)
