"""LoRA aggregation rules and the example-weighted mean, on tiny hand-built factors.

Each rule is driven through one server round the way the strategy drives it
(begin, params, observe/update per client, a plain mean step, finish) and checked
against the published rule: FedEx-LoRA's factor means plus exact residual fold,
FLoRA's everything-folded fresh adapter, FFA-LoRA's frozen A, FedSA-LoRA's local B.
"""

from __future__ import annotations

import math

import pytest
import torch

from fedelta.lora import A_SUFFIX, B_SUFFIX, FOLD_PREFIX, RankScaling, seeded_lora_A
from fedelta.seeding import derive_seed
from fedelta.strategies.aggregators.mean import Mean
from fedelta.strategies.base import EmptyRoundError
from fedelta.strategies.lora import (
    FedExLora,
    FedSaLora,
    FfaLora,
    FLoraStacking,
    LoraAggregation,
    NaiveLora,
)
from fedelta.tensors import SparseTensor

M = "layer.q"
A, B = M + A_SUFFIX, M + B_SUFFIX
HEAD = "head.bias"
SCALING = RankScaling(global_rank=4, alpha=8.0)  # scale = alpha / rank = 2
Tensors = dict[str, torch.Tensor]


def _diag_state(values: list[float]) -> Tensors:
    """B = I, A = diag(values): the product's components are the values, one per rank."""
    return {A: torch.diag(torch.tensor(values)), B: torch.eye(4), HEAD: torch.zeros(2)}


def _random_state(seed: int = 0) -> Tensors:
    g = torch.Generator().manual_seed(seed)
    return {
        A: torch.randn(4, 3, generator=g),
        B: torch.randn(5, 4, generator=g),
        HEAD: torch.randn(2, generator=g),
    }


def _run_round(
    rule: LoraAggregation,
    state: Tensors,
    clients: list[tuple[Tensors, int, float]],
    server_round: int = 1,
) -> Tensors:
    """One round with FedAvg's server step (params + weighted mean of the updates)."""
    rule.begin(server_round, state, [rank for _, rank, _ in clients])
    params = rule.params()
    mean = Mean()
    for delta, rank, weight in clients:
        rule.observe(delta, rank, weight)
        mean.add(rule.update(delta, rank), weight)
    step = mean.result()
    return rule.finish({k: v + step[k] if k in step else v for k, v in params.items()})


def _effective(state: Tensors, scale: float = 2.0) -> torch.Tensor:
    """``W - W0`` of the module: fold plus ``scale * B @ A``."""
    return state.get(FOLD_PREFIX + M, 0.0) + scale * state[B] @ state[A]


# -- what travels ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("rule", "sent"),
    [
        (NaiveLora, {A, B, HEAD}),
        (FfaLora, {B, HEAD}),
        (FedSaLora, {A, HEAD}),
        (FedExLora, {A, B, HEAD}),
    ],
)
def test_each_rule_exchanges_its_own_tensors(rule, sent):
    state = _random_state() | {FOLD_PREFIX + M: torch.zeros(5, 3)}
    aggregation = rule(SCALING)
    assert {k for k in state if aggregation.exchanged(k)} == sent
    adapter, _ = aggregation.downlink(state)
    assert set(adapter) == sent
    assert all(adapter[k] is state[k] for k in sent)


def test_factor_rules_start_from_the_adapter_as_is():
    state = _random_state()
    assert NaiveLora(SCALING).initial_state(state) == state
    assert NaiveLora(SCALING).downlink(state)[1] == {}


def test_folding_rules_start_with_a_zero_fold_per_module():
    state = FedExLora(SCALING).initial_state(_random_state())
    assert set(state) == {A, B, HEAD, FOLD_PREFIX + M}
    assert torch.equal(state[FOLD_PREFIX + M], torch.zeros(5, 3))


# -- factor-space rules ----------------------------------------------------------------
def test_naive_averages_each_factor_and_keeps_the_others():
    state = _random_state()
    d1 = {A: torch.ones(4, 3), B: torch.ones(5, 4), HEAD: torch.ones(2)}
    d2 = {A: -3 * torch.ones(4, 3), B: 5 * torch.ones(5, 4), HEAD: 3 * torch.ones(2)}
    new = _run_round(NaiveLora(SCALING), state, [(d1, 4, 3.0), (d2, 4, 1.0)])
    torch.testing.assert_close(new[A], state[A])  # (3 * 1 - 3) / 4 = 0
    torch.testing.assert_close(new[B], state[B] + 2.0)
    torch.testing.assert_close(new[HEAD], state[HEAD] + 1.5)


def test_ffa_never_moves_a_and_averages_b_exactly():
    state = _random_state()
    d1, d2 = {B: torch.ones(5, 4)}, {B: -torch.ones(5, 4)}
    rule = FfaLora(SCALING)
    new = _run_round(rule, state, [(d1, 4, 1.0), (d2, 4, 3.0)])
    assert torch.equal(new[A], state[A])
    torch.testing.assert_close(new[B], state[B] - 0.5)
    # linear in B: the new product is the weighted mean of the clients' products
    mean_product = (1 * (state[B] + 1) + 3 * (state[B] - 1)) @ state[A] / 4
    torch.testing.assert_close(new[B] @ new[A], mean_product)


def test_fedsa_averages_a_and_leaves_the_server_b_alone():
    state = _random_state()
    d1, d2 = {A: torch.full((2, 3), 2.0)}, {A: torch.zeros(4, 3)}
    new = _run_round(FedSaLora(SCALING), state, [(d1, 2, 1.0), (d2, 4, 1.0)])
    assert torch.equal(new[B], state[B])
    lifted = torch.cat([torch.full((2, 3), 2.0), torch.zeros(2, 3)])  # rank-2 A, zero-padded
    torch.testing.assert_close(new[A], state[A] + lifted / 2)


def test_a_lower_rank_client_update_is_padded_and_rescaled():
    delta = {A: torch.ones(2, 3), B: torch.ones(5, 2)}
    lifted = NaiveLora(SCALING).update(delta, 2)
    ratio = (8.0 / 2) / (8.0 / 4)  # scale(2) / scale(4): B carries the client's scale
    assert torch.equal(lifted[A], torch.cat([torch.ones(2, 3), torch.zeros(2, 3)]))
    assert torch.equal(lifted[B], torch.cat([torch.full((5, 2), ratio), torch.zeros(5, 2)], 1))


def test_factor_rules_keep_untouched_tensors_and_take_the_new_ones():
    state = _random_state()
    rule = NaiveLora(SCALING)
    rule.begin(1, state, [4])
    new = rule.finish({A: torch.zeros(4, 3)})
    assert torch.equal(new[A], torch.zeros(4, 3))
    assert new[B] is state[B] and new[HEAD] is state[HEAD]


def test_svd_projection_orders_components_and_keeps_the_product():
    state = _diag_state([1.0, 3.0, 2.0, 0.5])
    rule = NaiveLora(SCALING, svd_projection=True)
    rule.begin(1, state, [4])
    new = rule.finish({A: state[A], B: state[B]})
    torch.testing.assert_close(new[B] @ new[A], state[B] @ state[A])
    row_norms = new[A].norm(dim=1)
    torch.testing.assert_close(row_norms**2, torch.tensor([3.0, 2.0, 1.0, 0.5]))


def test_without_svd_projection_factors_are_stored_as_given():
    state = _diag_state([1.0, 3.0, 2.0, 0.5])
    rule = NaiveLora(SCALING)
    rule.begin(1, state, [4])
    new = rule.finish({A: state[A], B: state[B]})
    assert torch.equal(new[A], state[A]) and torch.equal(new[B], state[B])


# -- rank-projection error -------------------------------------------------------------
def test_rank_projection_error_is_the_tail_share_averaged_over_all_clients():
    state = _diag_state([3.0, -4.0, 2.0, -1.0])
    rule = NaiveLora(SCALING)
    rule.begin(1, state, [2, 4, 3, 4])
    share_2 = math.sqrt((2**2 + 1**2) / (3**2 + 4**2 + 2**2 + 1**2))
    share_3 = math.sqrt(1**2 / 30)
    assert rule.metrics() == pytest.approx({"rank-projection-error": (share_2 + share_3) / 4})


def test_rank_projection_error_of_small_updates():
    state = _diag_state([0.03, 0.04, 0.0, 0.0]) | {B: torch.eye(4) * 0.5}
    rule = FfaLora(SCALING)
    rule.begin(1, state, [1])
    # scale * B @ A = diag(0.03, 0.04, 0, 0): total squared norm far below 1
    assert rule.metrics() == pytest.approx({"rank-projection-error": 0.8})


def test_no_rank_projection_error_when_every_client_holds_the_global_rank():
    rule = NaiveLora(SCALING)
    rule.begin(1, _diag_state([1.0, 2.0, 3.0, 4.0]), [4, 4])
    assert rule.metrics() == {}


def test_a_zero_adapter_has_no_projection_error():
    rule = NaiveLora(SCALING)
    rule.begin(1, _diag_state([1.0, 2.0, 3.0, 4.0]) | {B: torch.zeros(4, 4)}, [2])
    assert rule.metrics() == {"rank-projection-error": 0.0}


def test_fedsa_reports_no_projection_error_since_b_stays_local():
    rule = FedSaLora(SCALING)
    rule.begin(1, _diag_state([1.0, 2.0, 3.0, 4.0]), [2])
    assert rule.metrics() == {}


def test_metrics_start_afresh_each_round():
    rule = NaiveLora(SCALING)
    rule.begin(1, _diag_state([1.0, 2.0, 3.0, 4.0]), [2])
    rule.begin(2, _diag_state([1.0, 2.0, 3.0, 4.0]), [4])
    assert rule.metrics() == {}


# -- folding rules ---------------------------------------------------------------------
def _fedex_clients() -> list[tuple[Tensors, int, float]]:
    g = torch.Generator().manual_seed(7)
    return [
        ({A: torch.randn(4, 3, generator=g), B: torch.randn(5, 4, generator=g)}, 4, w)
        for w in (1.0, 3.0)
    ]


def test_folding_params_are_the_effective_update_and_the_non_factors():
    state = FedExLora(SCALING).initial_state(_random_state())
    state[FOLD_PREFIX + M] = torch.ones(5, 3)
    rule = FedExLora(SCALING)
    rule.begin(1, state, [4])
    params = rule.params()
    assert set(params) == {HEAD, "total/" + M}
    torch.testing.assert_close(params["total/" + M], 1 + 2.0 * state[B] @ state[A])


def test_fedex_keeps_factor_means_and_folds_the_exact_residual():
    state = FedExLora(SCALING).initial_state(_random_state())
    clients = _fedex_clients()
    new = _run_round(FedExLora(SCALING), state, clients)
    total = sum(w for _, _, w in clients)
    mean_a = state[A] + sum(w * d[A] for d, _, w in clients) / total
    mean_b = state[B] + sum(w * d[B] for d, _, w in clients) / total
    torch.testing.assert_close(new[A], mean_a)
    torch.testing.assert_close(new[B], mean_b)
    # FedEx-LoRA residual: sum_i w_i scale B_i A_i - scale mean(B) mean(A)
    products = sum(w * 2.0 * (state[B] + d[B]) @ (state[A] + d[A]) for d, _, w in clients)
    residual = products / total - 2.0 * mean_b @ mean_a
    torch.testing.assert_close(new[FOLD_PREFIX + M], residual, atol=1e-5, rtol=1e-5)


def test_fedex_round_is_exact_for_mixed_ranks():
    state = FedExLora(SCALING).initial_state(_random_state())
    g = torch.Generator().manual_seed(1)
    low = {A: torch.randn(2, 3, generator=g), B: torch.randn(5, 2, generator=g)}
    full = {A: torch.randn(4, 3, generator=g), B: torch.randn(5, 4, generator=g)}
    new = _run_round(FedExLora(SCALING), state, [(low, 2, 1.0), (full, 4, 1.0)])
    # a rank-2 client starts from scale(2) * B'[:, :2] A[:2] with B' = B * scale / scale(2)
    b0, a0 = state[B][:, :2] * (2.0 / 4.0), state[A][:2]
    low_update = 4.0 * ((b0 + low[B]) @ (a0 + low[A]) - b0 @ a0)
    full_update = 2.0 * ((state[B] + full[B]) @ (state[A] + full[A]) - state[B] @ state[A])
    expected = _effective(state) + (low_update + full_update) / 2
    torch.testing.assert_close(_effective(new), expected, atol=1e-5, rtol=1e-5)


def test_flora_folds_everything_and_restarts_from_the_round_seed():
    state = FLoraStacking(SCALING).initial_state(_random_state())
    clients = _fedex_clients()
    rule = FLoraStacking(SCALING, seed=5)
    new = _run_round(rule, state, clients, server_round=3)
    assert torch.equal(new[A], seeded_lora_A(derive_seed(5, 3), M, 4, 3))
    assert torch.equal(new[B], torch.zeros(5, 4))
    stacked = sum(w * 2.0 * (state[B] + d[B]) @ (state[A] + d[A]) for d, _, w in clients) / 4
    torch.testing.assert_close(new[FOLD_PREFIX + M], stacked, atol=1e-5, rtol=1e-5)


def test_flora_adapters_differ_between_rounds():
    state = FLoraStacking(SCALING).initial_state(_random_state())
    a1 = _run_round(FLoraStacking(SCALING, seed=5), state, _fedex_clients(), 1)[A]
    a2 = _run_round(FLoraStacking(SCALING, seed=5), state, _fedex_clients(), 2)[A]
    assert not torch.equal(a1, a2)


def test_dense_fold_is_sent_as_is_without_an_error_metric():
    state = FedExLora(SCALING).initial_state(_random_state())
    state[FOLD_PREFIX + M] = torch.ones(5, 3)
    rule = FedExLora(SCALING)
    rule.begin(1, state, [4])
    adapter, folds = rule.downlink(state)
    assert set(adapter) == {A, B, HEAD}
    assert set(folds) == {M} and torch.equal(folds[M], torch.ones(5, 3))
    assert rule.metrics() == {}


def test_truncated_fold_reports_its_relative_error():
    state = FedExLora(SCALING).initial_state(_random_state())
    fold = torch.zeros(5, 3)
    fold[0, 0], fold[1, 1] = 3.0, 4.0
    state[FOLD_PREFIX + M] = fold
    rule = FedExLora(SCALING, fold_rank=1)
    rule.begin(1, state, [4])
    _, folds = rule.downlink(state)
    assert set(folds) == {M + ".U", M + ".V"}
    kept = torch.zeros(5, 3)
    kept[1, 1] = 4.0  # the best rank-1 approximation keeps the larger component
    torch.testing.assert_close(folds[M + ".U"] @ folds[M + ".V"], kept)
    assert rule.metrics() == pytest.approx({"fold-error": 0.6})  # sqrt(3^2 / (3^2 + 4^2))


# -- the example-weighted mean ---------------------------------------------------------
def test_mean_weights_each_update_by_its_examples():
    mean = Mean()
    mean.add({"w": torch.tensor([1.0, 2.0])}, 1.0)
    mean.add({"w": torch.tensor([5.0, -2.0])}, 3.0)
    out = mean.result()
    assert out["w"].dtype == torch.float32
    assert out["w"].tolist() == [4.0, -1.0]


def test_mean_of_a_single_unit_weight_update_is_the_update():
    mean = Mean()
    mean.add({"w": torch.tensor([[1.5, -2.0]])}, 1.0)
    assert torch.equal(mean.result()["w"], torch.tensor([[1.5, -2.0]]))


def test_mean_accumulates_in_double_precision():
    mean = Mean()
    for value in (2.0**24, 1.0, -(2.0**24)):  # fp32 would lose the 1.0
        mean.add({"w": torch.tensor([value])}, 1.0)
    assert mean.result()["w"].item() == pytest.approx(1 / 3)


def test_sparse_updates_count_as_zero_elsewhere_by_default():
    mean = Mean()
    mean.add({"w": SparseTensor(torch.tensor([1, 3]), torch.tensor([4.0, 8.0]), (2, 2))}, 1.0)
    mean.add({"w": torch.tensor([[2.0, 2.0], [2.0, 2.0]])}, 3.0)
    assert mean.result()["w"].tolist() == [[1.5, 2.5], [1.5, 3.5]]


def test_senders_weighting_divides_by_the_weight_that_sent_each_coordinate():
    mean = Mean("senders")
    mean.add({"w": SparseTensor(torch.tensor([0, 1]), torch.tensor([4.0, 8.0]), (4,))}, 0.25)
    mean.add({"w": SparseTensor(torch.tensor([1]), torch.tensor([2.0]), (4,))}, 0.5)
    mean.add({"v": torch.tensor([3.0])}, 0.125)
    out = mean.result()
    # w[0]: only the first sender; w[1]: both, (0.25 * 8 + 0.5 * 2) / 0.75; w[2:]: nobody
    assert out["w"].tolist() == pytest.approx([4.0, 4.0, 0.0, 0.0])
    assert out["v"].tolist() == [3.0]


def test_senders_weighting_with_dense_updates_is_the_plain_mean():
    mean = Mean("senders")
    mean.add({"w": torch.tensor([1.0, 3.0])}, 2.0)
    mean.add({"w": torch.tensor([4.0, 0.0])}, 1.0)
    assert mean.result()["w"].tolist() == [2.0, 2.0]


def test_mean_refuses_non_positive_weights_and_accepts_fractional_ones():
    mean = Mean()
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match=f"^update weight must be positive, got {bad}$"):
            mean.add({"w": torch.ones(1)}, bad)
    mean.add({"w": torch.ones(1)}, 0.5)
    assert mean.result()["w"].tolist() == [1.0]


def test_an_empty_round_has_no_mean():
    with pytest.raises(EmptyRoundError, match="^no client update was accumulated this round$"):
        Mean().result()
    mean = Mean()
    mean.add({"w": torch.ones(1)}, 2.0)
    mean.begin()
    with pytest.raises(EmptyRoundError):
        mean.result()


def test_begin_forgets_the_previous_round():
    mean = Mean("senders")
    mean.add({"w": torch.tensor([9.0])}, 1.0)
    mean.begin(2)
    mean.add({"w": SparseTensor(torch.tensor([0]), torch.tensor([1.0]), (2,))}, 1.0)
    assert mean.result()["w"].tolist() == [1.0, 0.0]


def test_unknown_weighting_is_refused():
    with pytest.raises(ValueError, match="weighting must be one of \\('all', 'senders'\\)"):
        Mean("examples")
