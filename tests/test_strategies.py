"""Server optimizers against the published update rules, robust rules against hand
computation, and the composition a run config builds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedelta.config import ConfigError, RunConfig
from fedelta.lora import RankScaling
from fedelta.strategies import (
    DeltaStrategy,
    EmptyRoundError,
    build_strategy,
)
from fedelta.strategies.aggregators import (
    Krum,
    Mean,
    Median,
    MultiKrum,
    TrimmedMean,
    clip_to_norm,
)
from fedelta.strategies.lora import NaiveLora
from fedelta.strategies.optimizers import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedProx, FedYogi


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
            "strategy.name": "fedyogi",
            "strategy.lora": "ffa",
            "strategy.robust": "trimmed-mean",
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
        ({"strategy.name": "fedsgd"}, "'strategy.name' must be one of"),
        ({"strategy.lora": "hetlora"}, "'strategy.lora' must be one of"),
        ({"strategy.robust": "bulyan"}, "'strategy.robust' must be one of"),
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
        RunConfig().replace(**overrides)


def test_fedprox_proximal_term_holds_clients_near_the_global_weights():
    from types import SimpleNamespace

    from fedelta.training import train

    class Pull(torch.nn.Module):
        """Loss pulls w to the target; the proximal term pulls it back to the anchor."""

        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(3))

        def forward(self, target):
            return SimpleNamespace(loss=(self.w - target).pow(2).sum())

    batches = [{"target": torch.full((3,), 10.0)}] * 30
    moved = {}
    for mu in (0.0, 50.0):
        model = Pull()
        result = train(model, batches, lr=0.5, proximal_mu=mu, anchor={"w": torch.zeros(3)})
        moved[mu] = float(model.w.detach().norm())
        assert result.steps == 30
    assert moved[50.0] < moved[0.0] / 4


def test_a_strategy_object_must_match_the_clients_lora_rule():
    from fedelta.server.federation import Federation

    config = RunConfig()
    ffa = build_strategy(config.replace(**{"strategy.lora": "ffa"}))
    with pytest.raises(ConfigError, match="clients follow the config's strategy.lora = 'naive'"):
        Federation(None, config, None, strategy=ffa)
