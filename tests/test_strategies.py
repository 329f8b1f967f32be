"""Server optimizers against the published update rules, robust rules against hand
computation, and the composition a run config builds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedelta.build import build_aggregator, build_strategy
from fedelta.compatibility import check_config
from fedelta.config import ConfigError, RunConfig
from fedelta.lora import RankScaling
from fedelta.strategies import DeltaStrategy, EmptyRoundError
from fedelta.strategies.aggregators import (
    Krum,
    Mean,
    Median,
    MergeAggregator,
    MultiKrum,
    TrimmedMean,
)
from fedelta.strategies.lora import NaiveLora
from fedelta.strategies.optimizers import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedProx, FedYogi
from fedelta.tensors import clip_to_norm, global_norm


def plain(optimizer=None, aggregator=None, clip_norm=0.0) -> DeltaStrategy:
    """A strategy over plain (non-LoRA) tensors."""
    return DeltaStrategy(NaiveLora(RankScaling(8, 16)), optimizer, aggregator, clip_norm)


def run_round(strategy, state, updates):
    strategy.begin_round(1, state)
    for delta, n in updates:
        strategy.accumulate(delta, n)
    return strategy.finish_round(state)


# -- FedAvg -----------------------------------------------------------------------------
def test_fedavg_equals_a_hand_computed_weighted_mean():
    global_state = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.5])}
    updates = [
        ({"w": torch.tensor([1.0, 0.0]), "b": torch.tensor([3.0])}, 10),
        ({"w": torch.tensor([-2.0, 4.0]), "b": torch.tensor([0.0])}, 30),
        ({"w": torch.tensor([0.0, 1.0]), "b": torch.tensor([-1.0])}, 60),
    ]
    new = run_round(plain(), global_state, updates)
    # w: (10*1 + 30*-2 + 60*0)/100 = -0.5 ; (10*0 + 30*4 + 60*1)/100 = 1.8
    # b: (10*3 + 0 - 60)/100 = -0.3
    assert torch.allclose(new["w"], torch.tensor([1.0 - 0.5, 2.0 + 1.8]))
    assert torch.allclose(new["b"], torch.tensor([0.5 - 0.3]))
    assert torch.equal(global_state["w"], torch.tensor([1.0, 2.0]))  # input untouched


def test_accumulators_reset_each_round():
    strategy = plain()
    state = run_round(strategy, {"w": torch.zeros(1)}, [({"w": torch.ones(1)}, 5)])
    state = run_round(strategy, state, [({"w": torch.full((1,), 3.0)}, 1)])
    assert torch.equal(state["w"], torch.tensor([4.0]))


def test_an_empty_round_is_refused_not_averaged():
    strategy = plain()
    strategy.begin_round(1, {"w": torch.zeros(1)})
    with pytest.raises(EmptyRoundError):
        strategy.finish_round({"w": torch.zeros(1)})
    with pytest.raises(ValueError, match="num-examples must be positive"):
        strategy.accumulate({"w": torch.ones(1)}, 0)


def test_the_mean_does_not_depend_on_reply_order():
    # Replies arrive in any order; a run must still be reproducible to the bit.
    g = torch.Generator().manual_seed(1)
    state = {"w": torch.randn(1000, generator=g)}
    updates = [({"w": torch.randn(1000, generator=g) * 10**k}, 7 + k) for k in range(-3, 4)]
    results = [
        run_round(plain(), state, order)["w"]
        for order in (updates, updates[::-1], updates[3:] + updates[:3])
    ]
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


# -- server optimizers against the published rules -------------------------------------
def reference(rule: str, x, deltas, lr, beta1=0.9, beta2=0.99, tau=1e-3, momentum=0.9):
    """Reddi et al. 2021, Algorithm 2 (and FedAvgM, Hsu et al. 2019), in numpy float64."""
    x = np.array(x, dtype=np.float64)
    m = np.zeros_like(x)
    v = np.full_like(x, tau**2)
    velocity = np.zeros_like(x)
    for d in deltas:
        d = np.asarray(d, dtype=np.float64)
        if rule == "fedavgm":
            velocity = momentum * velocity + d
            x = x + lr * velocity
            continue
        m = beta1 * m + (1 - beta1) * d
        if rule == "fedadagrad":
            v = v + d**2
        elif rule == "fedyogi":
            v = v - (1 - beta2) * d**2 * np.sign(v - d**2)
        else:
            v = beta2 * v + (1 - beta2) * d**2
        x = x + lr * m / (np.sqrt(v) + tau)
    return x


@pytest.mark.parametrize(
    "optimizer",
    [FedAdam(lr=0.05), FedYogi(lr=0.05), FedAdagrad(lr=0.05), FedAvgM(lr=0.7, momentum=0.8)],
    ids=lambda o: o.name,
)
def test_server_optimizers_follow_the_published_update_rules(optimizer):
    x0 = [0.5, -1.0, 0.0, 2.0]
    deltas = [[0.1, -0.2, 0.0, 1e-4], [0.3, 0.1, -0.05, 0.0], [-0.2, 0.4, 0.02, -3.0]]
    strategy = plain(optimizer)
    state = {"x": torch.tensor(x0)}
    for d in deltas:
        state = run_round(strategy, state, [({"x": torch.tensor(d)}, 3)])
    kwargs = {"momentum": 0.8} if optimizer.name == "fedavgm" else {}
    expected = reference(optimizer.name, x0, deltas, optimizer.lr, **kwargs)
    np.testing.assert_allclose(state["x"].numpy(), expected, rtol=1e-5, atol=1e-7)


def test_optimizer_state_survives_a_checkpoint():
    deltas = [torch.tensor([0.1, -0.3]), torch.tensor([0.2, 0.2]), torch.tensor([-0.4, 0.1])]
    straight = plain(FedAdam())
    state = {"x": torch.zeros(2)}
    for d in deltas:
        state = run_round(straight, state, [({"x": d}, 1)])
    first = plain(FedAdam())
    resumed_state = {"x": torch.zeros(2)}
    for d in deltas[:2]:
        resumed_state = run_round(first, resumed_state, [({"x": d}, 1)])
    tensors, meta = first.state_dict()
    second = plain(FedAdam())
    second.load_state_dict(tensors, meta)
    resumed_state = run_round(second, resumed_state, [({"x": deltas[2]}, 1)])
    assert torch.equal(state["x"], resumed_state["x"])
    with pytest.raises(ValueError, match="written by strategy 'fedadam"):
        plain(FedYogi()).load_state_dict(tensors, meta)


def test_fedprox_asks_clients_for_the_proximal_term():
    assert plain(FedProx(mu=0.05)).client_config(1) == {"proximal-mu": 0.05}
    assert plain(FedAvg()).client_config(1) == {}


def test_default_server_learning_rates():
    assert FedAvg().lr == 1.0 and FedAvgM().lr == 1.0
    assert FedAdam().lr == FedYogi().lr == FedAdagrad().lr == 1e-2
    assert FedAdam(lr=0.3).lr == 0.3


# -- robust rules against hand computation ---------------------------------------------
def combine(aggregator, values, weights=None):
    aggregator.begin()
    for i, v in enumerate(values):
        aggregator.add({"x": torch.tensor(v, dtype=torch.float32)}, (weights or [1] * 10)[i])
    return aggregator.result()["x"]


def test_coordinate_median():
    assert combine(Median(), [[1.0, -5.0], [5.0, 0.0], [2.0, 9.0]]).tolist() == [2.0, 0.0]
    assert combine(Median(), [[1.0], [2.0], [3.0], [10.0]]).tolist() == [2.5]


def test_trimmed_mean_drops_the_extremes_per_coordinate():
    values = [[1.0, 100.0], [2.0, -100.0], [3.0, 0.0], [1000.0, 1.0]]
    # beta = 0.25 of 4 drops one value at each end: [2, 3] and [0, 1].
    assert combine(TrimmedMean(0.25), values).tolist() == [2.5, 0.5]
    assert combine(TrimmedMean(0.0), [[1.0], [3.0]]).tolist() == [2.0]


def test_krum_selects_the_most_central_update():
    values = [[0.0], [0.1], [0.25], [10.0]]
    # f = 1: each update scored by the squared distance to its n - f - 2 = 1 nearest other:
    # 0 -> 0.01, 0.1 -> 0.01, 0.25 -> 0.0225, 10 -> 95.06; ties go to the first.
    krum = Krum(byzantine=1)
    assert combine(krum, values).tolist() == [0.0]
    assert krum.metrics() == {"krum-selected": 1.0}
    # Multi-Krum keeps n - f = 3 and averages them by examples: (0*1 + 0.1*1 + 0.25*2) / 4.
    multi = combine(MultiKrum(byzantine=1), values, [1, 1, 2, 100])
    assert multi.tolist() == pytest.approx([0.15])


def test_norm_bounding_scales_only_large_updates():
    clipped, was = clip_to_norm({"a": torch.tensor([3.0]), "b": torch.tensor([4.0])}, 1.0)
    assert (
        was
        and clipped["a"].item() == pytest.approx(0.6)
        and clipped["b"].item() == pytest.approx(0.8)
    )
    kept, was = clip_to_norm({"a": torch.tensor([0.3])}, 1.0)
    assert not was and kept["a"].item() == pytest.approx(0.3)


def test_robust_rules_compose_with_clipping_and_optimizers():
    strategy = plain(FedAvgM(lr=1.0, momentum=0.5), Median(), clip_norm=1.0)
    state = {"x": torch.zeros(1)}
    updates = [
        ({"x": torch.tensor([0.5])}, 1),
        ({"x": torch.tensor([0.7])}, 1),
        ({"x": torch.tensor([100.0])}, 1),
    ]
    state = run_round(strategy, state, updates)
    # clipped to [0.5, 0.7, 1.0]; median 0.7; first momentum step = 0.7
    assert state["x"].item() == pytest.approx(0.7)
    assert strategy.round_metrics()["clients-clipped"] == 1.0
    state = run_round(strategy, state, updates)
    assert state["x"].item() == pytest.approx(0.7 + 0.7 + 0.5 * 0.7)
    caps = strategy.capabilities
    assert not caps.exact and not caps.linear and not caps.streaming


def test_mean_rejects_empty_and_non_positive_weights():
    with pytest.raises(EmptyRoundError):
        Mean().result()
    with pytest.raises(ValueError):
        Mean().add({"x": torch.ones(1)}, 0)


# -- built from config -------------------------------------------------------------------
def test_strategy_is_composed_from_the_config_table():
    config = RunConfig().replace(
        **{
            "strategy.optimizer": "fedyogi",
            "strategy.lora": "ffa",
            "strategy.aggregator": "trimmed-mean",
            "strategy.trim-fraction": 0.2,
            "strategy.clip-norm": 2.0,
            "strategy.server-lr": 0.05,
        }
    )
    strategy = build_strategy(config)
    assert strategy.name == "fedyogi+ffa+trimmed-mean+clip2"
    assert isinstance(strategy.optimizer, FedYogi) and strategy.optimizer.lr == 0.05
    assert strategy.aggregator.trim_fraction == 0.2
    assert build_strategy(RunConfig()).name == "fedavg+naive"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"strategy.optimizer": "fedsgd"}, "'strategy.optimizer' must be one of"),
        ({"strategy.lora": "hetlora"}, "'strategy.lora' must be one of"),
        ({"strategy.aggregator": "bulyan"}, "'strategy.aggregator' must be one of"),
        ({"strategy.trim-fraction": 0.5}, "'strategy.trim-fraction' must be in"),
        ({"lora.client-ranks": "2,16"}, "outside \\[1, lora.r = 8\\]"),
        ({"lora.client-ranks": "2,x"}, "comma-separated integers"),
        (
            {"strategy.lora": "ffa", "strategy.rank-projection": "svd"},
            "keeps fixed, local or empty",
        ),
    ],
)
def test_bad_strategy_config_is_refused_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_config(RunConfig().replace(**overrides))


class _Pull(torch.nn.Module):
    """Loss ``||w - target||^2`` on one parameter vector: its gradient is known by hand."""

    def __init__(self, w: list[float]) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(w, dtype=torch.float64))

    def forward(self, target: torch.Tensor):
        from types import SimpleNamespace

        return SimpleNamespace(loss=(self.w - target).pow(2).sum())


def test_fedprox_adds_mu_over_2_times_the_squared_distance_to_the_anchor():
    from fedelta.training import train

    w0 = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    anchor = torch.tensor([0.5, 0.25, -1.0], dtype=torch.float64)  # not where training starts
    target = torch.full((3,), 10.0, dtype=torch.float64)
    lr, mu = 0.1, 0.4
    model = _Pull(w0.tolist())
    sgd = torch.optim.SGD(model.parameters(), lr=lr)
    batches = [{"target": target}] * 2
    result = train(model, batches, lr=lr, optimizer=sgd, proximal_mu=mu, anchor={"w": anchor})
    # d/dw [||w - t||^2 + mu/2 ||w - anchor||^2] = 2 (w - t) + mu (w - anchor)
    w = w0.clone()
    for _ in range(2):
        w = w - lr * (2 * (w - target) + mu * (w - anchor))
    torch.testing.assert_close(model.w.detach(), w, rtol=1e-12, atol=1e-12)
    # The reported loss leaves the proximal term out.
    first = (w0 - target).pow(2).sum()
    second = (w0 - lr * (2 * (w0 - target) + mu * (w0 - anchor)) - target).pow(2).sum()
    assert result.loss == pytest.approx(float(first + second) / 2, rel=1e-12)


def test_weight_decay_is_adamw_decoupled_decay():
    from fedelta.training import train

    w0 = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    target = torch.tensor([0.0, 1.0, 5.0], dtype=torch.float64)
    lr, decay = 0.01, 0.5
    model = _Pull(w0.tolist())
    train(model, [{"target": target}], lr=lr, weight_decay=decay)
    # AdamW's first step: bias-corrected m / sqrt(v) = g / |g|; the decay multiplies the
    # weights by (1 - lr * decay) and never goes through the moments (Loshchilov & Hutter).
    g = 2 * (w0 - target)
    expected = w0 * (1 - lr * decay) - lr * g / (g.abs() + 1e-8)
    torch.testing.assert_close(model.w.detach(), expected, rtol=1e-12, atol=1e-12)


def test_a_strategy_object_must_match_the_clients_lora_rule():
    from fedelta.server.federation import Federation

    config = RunConfig()
    ffa = build_strategy(config.replace(**{"strategy.lora": "ffa"}))
    with pytest.raises(ConfigError, match="clients follow the config's strategy.lora = 'naive'"):
        Federation(None, config, None, strategy=ffa)


# -- config settings reach the objects they configure -----------------------------------
DELTAS = [[0.1, -0.2, 0.0, 1e-4], [0.3, 0.1, -0.05, 0.0], [-0.2, 0.4, 0.02, -3.0]]
X0 = [0.5, -1.0, 0.0, 2.0]


def trajectory(strategy: DeltaStrategy) -> np.ndarray:
    """Where three rounds of ``DELTAS`` (one client each) take ``X0``."""
    state = {"x": torch.tensor(X0)}
    for d in DELTAS:
        state = run_round(strategy, state, [({"x": torch.tensor(d)}, 3)])
    return state["x"].numpy()


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad"])
def test_adaptive_optimizer_settings_from_config_drive_the_server_step(name: str) -> None:
    """Non-default beta1, beta2, tau and server-lr must all change the trajectory as the
    published rule says; a setting dropped on the way would fall back to its default."""
    settings = {"beta1": 0.5, "beta2": 0.7, "tau": 0.01}
    config = RunConfig().replace(
        **{"strategy.optimizer": name, "strategy.server-lr": 0.2},
        **{f"strategy.{k}": v for k, v in settings.items()},
    )
    expected = reference(name, X0, DELTAS, 0.2, **settings)
    np.testing.assert_allclose(trajectory(build_strategy(config)), expected, rtol=1e-5, atol=1e-7)


def test_fedavgm_momentum_and_lr_from_config_drive_the_server_step() -> None:
    config = RunConfig().replace(
        **{"strategy.optimizer": "fedavgm", "strategy.server-lr": 0.7, "strategy.momentum": 0.5}
    )
    expected = reference("fedavgm", X0, DELTAS, 0.7, momentum=0.5)
    np.testing.assert_allclose(trajectory(build_strategy(config)), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["fedavg", "fedprox"])
def test_server_lr_from_config_scales_the_mean_delta(name: str) -> None:
    config = RunConfig().replace(
        **{"strategy.optimizer": name, "strategy.server-lr": 0.5, "strategy.proximal-mu": 0.3}
    )
    strategy = build_strategy(config)
    expected = np.array(X0) + 0.5 * np.sum(DELTAS, axis=0)
    np.testing.assert_allclose(trajectory(strategy), expected, rtol=1e-5, atol=1e-6)
    assert strategy.client_config(1) == ({"proximal-mu": 0.3} if name == "fedprox" else {})


def test_fedyogi_keeps_v_when_the_squared_delta_equals_it() -> None:
    """sign(v - d^2) = 0 leaves v unchanged (Reddi et al.): with tau = 0.5, v starts at
    0.25 and a delta of +-0.5 hits that exactly."""
    deltas = [[0.5, -0.5, 0.1], [0.5, 0.2, -0.5]]
    x0 = [0.0, 1.0, -1.0]
    strategy = plain(FedYogi(lr=0.1, tau=0.5))
    state = {"x": torch.tensor(x0)}
    for d in deltas:
        state = run_round(strategy, state, [({"x": torch.tensor(d)}, 1)])
    expected = reference("fedyogi", x0, deltas, 0.1, tau=0.5)
    np.testing.assert_allclose(state["x"].numpy(), expected, rtol=1e-6)
    assert np.isfinite(state["x"].numpy()).all()


@pytest.mark.parametrize(
    "name", ["fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedprox"]
)
def test_optimizers_built_in_python_default_to_the_config_defaults(name: str) -> None:
    """``FedAdam()`` in code behaves like ``strategy.optimizer = "fedadam"`` and nothing else."""
    from fedelta.strategies import OPTIMIZERS

    from_config = build_strategy(RunConfig().replace(**{"strategy.optimizer": name}))
    in_code = plain(OPTIMIZERS[name]())
    np.testing.assert_array_equal(trajectory(in_code), trajectory(from_config))
    assert in_code.client_config(1) == from_config.client_config(1)


# -- robust rules: settings, edge cases and defaults -------------------------------------
POINTS = [(0.0, 0.0), (1.0, 0.0), (0.0, 2.0), (1.0, 1.0), (5.0, 5.0)]
"""Five clients, each an update of two one-element tensors. Squared distances:
0-1: 1, 0-2: 4, 0-3: 2, 0-4: 50, 1-2: 5, 1-3: 1, 1-4: 41, 2-3: 2, 2-4: 34, 3-4: 32."""


def fill(aggregator, points=POINTS, weights=None):
    aggregator.begin(1)
    for i, (a, b) in enumerate(points):
        weight = weights[i] if weights else 1
        aggregator.add({"b": torch.tensor([b]), "a": torch.tensor([a])}, weight)
    return aggregator


def as_point(update: dict[str, torch.Tensor]) -> tuple[float, float]:
    return update["a"].item(), update["b"].item()


def test_krum_scores_sum_the_squared_distances_to_the_nearest_neighbours() -> None:
    # f = 1, n = 5: the n - f - 2 = 2 nearest others.
    # 0: 1 + 2, 1: 1 + 1, 2: 2 + 4, 3: 1 + 2, 4: 32 + 34.
    krum = fill(Krum(byzantine=1))
    assert krum.scores().tolist() == pytest.approx([3.0, 2.0, 6.0, 3.0, 66.0])
    assert as_point(krum.result()) == (1.0, 0.0)
    # f = 2: one nearest other each; the tie between 0, 1 and 3 goes to the first.
    krum = fill(Krum(byzantine=2))
    assert krum.scores().tolist() == pytest.approx([1.0, 1.0, 2.0, 1.0, 32.0])
    assert as_point(krum.result()) == (0.0, 0.0)


def test_krum_scores_of_two_and_of_one_update() -> None:
    # Fewer updates than n - f - 2 neighbours: each is scored by the one other there is.
    pair = fill(Krum(byzantine=0), POINTS[1:3])
    assert pair.scores().tolist() == pytest.approx([5.0, 5.0])
    single = Krum()
    assert single.metrics() == {"krum-selected": 0.0}
    fill(single, POINTS[4:])
    assert single.scores().tolist() == [0.0]
    assert as_point(single.result()) == (5.0, 5.0)
    assert single.metrics() == {"krum-selected": 1.0}
    assert as_point(fill(MultiKrum(byzantine=1), POINTS[4:]).result()) == (5.0, 5.0)


def test_multi_krum_keeps_n_minus_f_but_at_least_one() -> None:
    # Default keep = n - f = 4 drops the outlier (5, 5); weights 1, 1, 2, 4.
    multi = fill(MultiKrum(byzantine=1), weights=[1, 1, 2, 4, 1])
    a, b = as_point(multi.result())
    assert (a, b) == pytest.approx(((0 + 1 + 0 + 4) / 8, (0 + 0 + 4 + 4) / 8))
    assert multi.metrics() == {"krum-selected": 4.0}
    # n = 3, f = 2: n - f = 1, so only the best-scored (the first of a tie) is kept.
    values = [[0.0], [1.0], [5.0]]
    assert combine(MultiKrum(byzantine=2), values).tolist() == [0.0]


def test_krum_breaks_score_ties_by_arrival_order() -> None:
    """Twenty one-hot updates are all at squared distance 2 of each other: every score
    ties, and the earliest replies must win so that a run is reproducible."""
    updates = torch.eye(20).tolist()
    assert combine(Krum(byzantine=1), updates, [1] * 20).tolist() == updates[0]
    expected = (torch.eye(20)[:3].sum(dim=0) / 3).tolist()
    assert combine(MultiKrum(1, keep=3), updates, [1] * 20).tolist() == pytest.approx(expected)


def test_krum_settings_from_config_change_the_selection() -> None:
    def built(**overrides):
        config = RunConfig().replace(**{f"strategy.{k}": v for k, v in overrides.items()})
        return fill(build_aggregator(config))

    assert as_point(built(aggregator="krum").result()) == (1.0, 0.0)  # f = 1 by default
    assert as_point(built(aggregator="krum", byzantine=2).result()) == (0.0, 0.0)
    # f = 2 scores [1, 1, 2, 1, 32]; keep 2 averages the first two of the tie.
    multi = built(aggregator="multi-krum", byzantine=2, **{"krum-keep": 2})
    assert as_point(multi.result()) == (0.5, 0.0)
    default_keep = built(aggregator="multi-krum", byzantine=2)  # n - f = 3: 0, 1 and 3
    assert as_point(default_keep.result()) == pytest.approx((2 / 3, 1 / 3))


def test_median_of_an_odd_count_and_of_one_update() -> None:
    values = [[5.0], [1.0], [4.0], [2.0], [3.0]]
    assert combine(Median(), values).tolist() == [3.0]
    assert combine(Median(), [[7.0, -1.0]]).tolist() == [7.0, -1.0]


def test_trimmed_mean_of_one_update_and_its_bounds() -> None:
    assert combine(TrimmedMean(0.4), [[7.0, -1.0]]).tolist() == [7.0, -1.0]
    with pytest.raises(ValueError, match=r"trim fraction must be in \[0, 0.5\), got 0.5"):
        TrimmedMean(0.5)
    with pytest.raises(ValueError, match="trim fraction"):
        TrimmedMean(-0.1)


def test_robust_rules_built_in_python_default_to_the_config_defaults() -> None:
    """``TrimmedMean()``, ``Krum()``, ``MultiKrum()`` behave as the config's defaults."""
    values = [[float(v)] for v in (0, 1, 2, 3, 4, 5, 6, 7, 8, 100)]
    for robust, in_code in (
        ("trimmed-mean", TrimmedMean()),
        ("krum", Krum()),
        ("multi-krum", MultiKrum()),
    ):
        config = RunConfig().replace(**{"strategy.aggregator": robust})
        expected = combine(build_aggregator(config), values)
        assert torch.equal(combine(in_code, values), expected), robust
    # trim 0.1 of 10 drops one value at each end.
    assert combine(TrimmedMean(), values).tolist() == [4.5]
    # f = 1 on POINTS: Krum picks (1, 0) (f = 2 would pick (0, 0)), Multi-Krum keeps 4.
    assert as_point(fill(Krum()).result()) == (1.0, 0.0)
    assert as_point(fill(MultiKrum()).result()) == (0.5, 0.75)


AGGREGATOR_FACTORIES = {
    "median": Median,
    "trimmed-mean": lambda: TrimmedMean(0.2),
    "krum": Krum,
    "multi-krum": MultiKrum,
    "dare-linear": lambda: MergeAggregator("dare-linear", 0.5, seed=3),
}


@pytest.mark.parametrize("name", sorted(AGGREGATOR_FACTORIES))
def test_a_fresh_aggregator_is_an_empty_round_zero(name: str) -> None:
    """Built and used at once, ``begin()``, or ``begin(0)``: the same empty round 0."""
    g = torch.Generator().manual_seed(0)
    updates = [{"x": torch.randn(16, generator=g)} for _ in range(4)]
    results = []
    for start in (None, (), (0,)):
        aggregator = AGGREGATOR_FACTORIES[name]()
        if start is not None:
            aggregator.begin(*start)
        for i, u in enumerate(updates):
            aggregator.add(u, i + 1)
        results.append(aggregator.result()["x"])
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
    empty = AGGREGATOR_FACTORIES[name]()
    with pytest.raises(EmptyRoundError, match="^no client update was accumulated this round$"):
        empty.result()


# -- merge operators as the aggregator ---------------------------------------------
def merged(method: str, updates, weights, density: float = 0.5, seed: int = 0, rnd: int = 1):
    aggregator = MergeAggregator(method, density, seed)
    aggregator.begin(rnd)
    for u, w in zip(updates, weights, strict=True):
        aggregator.add(u, w)
    return aggregator.result()


def test_magnitude_prune_aggregation_is_an_example_weighted_sum_of_pruned_updates() -> None:
    # Density 0.5 keeps each client's two largest entries; example shares 1/4 and 3/4.
    u1 = {"x": torch.tensor([4.0, -1.0, 0.5, 2.0])}
    u2 = {"x": torch.tensor([1.0, -3.0, 2.0, 0.1])}
    result = merged("magnitude-prune", [u1, u2], [10, 30])["x"]
    expected = 0.25 * torch.tensor([4.0, 0, 0, 2.0]) + 0.75 * torch.tensor([0, -3.0, 2.0, 0])
    torch.testing.assert_close(result, expected)


def test_dare_drops_depend_on_run_seed_round_and_tensor() -> None:
    """The same run seed and round give the same drops in every process; another seed,
    another round or another tensor draws an independent mask."""
    x = torch.arange(1.0, 65.0)
    update = [{"p": x.clone(), "q": x.clone()}]

    def run(seed: int, rnd: int) -> dict[str, torch.Tensor]:
        config = RunConfig().replace(
            **{"seed": seed, "strategy.aggregator": "dare-linear", "strategy.merge-density": 0.5}
        )
        aggregator = build_aggregator(config)
        aggregator.begin(rnd)
        aggregator.add(update[0], 5)
        return aggregator.result()

    first = run(1, 1)
    kept = first["p"] != 0
    # DARE keeps entries and rescales them by 1 / density.
    torch.testing.assert_close(first["p"][kept], 2 * x[kept])
    assert 0 < int(kept.sum()) < 64
    assert torch.equal(first["p"], run(1, 1)["p"])
    assert not torch.equal(first["p"], run(2, 1)["p"])
    assert not torch.equal(first["p"], run(1, 2)["p"])
    assert not torch.equal(first["p"], first["q"])


def test_merge_aggregation_names_the_strategy_and_refuses_unknown_methods() -> None:
    config = RunConfig().replace(**{"strategy.aggregator": "ties"})
    assert build_strategy(config).name == "fedavg+naive+ties"
    with pytest.raises(ValueError, match=r"unknown merge method 'bulyan'; one of \['dare-"):
        MergeAggregator("bulyan", 0.5)


def test_norm_bounding_of_sparse_updates_and_at_the_bound() -> None:
    """A sparse update's norm is that of its kept entries; it stays sparse when scaled. An
    update exactly at the bound is not counted as clipped."""
    from fedelta.tensors import SparseTensor

    sparse = SparseTensor(torch.tensor([1, 4]), torch.tensor([3.0, 4.0]), (2, 3))
    update = {"s": sparse, "d": torch.tensor([12.0])}
    assert global_norm(update) == pytest.approx(13.0)
    clipped, was = clip_to_norm(update, 6.5)
    assert was and isinstance(clipped["s"], SparseTensor)
    assert clipped["s"].indices.tolist() == [1, 4]
    assert clipped["s"].values.tolist() == pytest.approx([1.5, 2.0])
    assert clipped["d"].tolist() == pytest.approx([6.0])
    kept, was = clip_to_norm({"x": torch.tensor([3.0, 4.0])}, 5.0)
    assert not was and kept["x"].tolist() == [3.0, 4.0]
