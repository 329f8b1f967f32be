import pytest
import torch

from fedelta.strategies import STRATEGIES, EmptyRoundError, FedAvg, build_strategy


def test_fedavg_equals_a_hand_computed_weighted_mean():
    global_state = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.5])}
    updates = [
        ({"w": torch.tensor([1.0, 0.0]), "b": torch.tensor([3.0])}, 10),
        ({"w": torch.tensor([-2.0, 4.0]), "b": torch.tensor([0.0])}, 30),
        ({"w": torch.tensor([0.0, 1.0]), "b": torch.tensor([-1.0])}, 60),
    ]
    strategy = FedAvg()
    strategy.begin_round(global_state)
    for delta, n in updates:
        strategy.accumulate(delta, n)
    new = strategy.finish_round(global_state)
    # w: (10*1 + 30*-2 + 60*0)/100 = -0.5 ; (10*0 + 30*4 + 60*1)/100 = 1.8
    # b: (10*3 + 0 - 60)/100 = -0.3
    assert torch.allclose(new["w"], torch.tensor([1.0 - 0.5, 2.0 + 1.8]))
    assert torch.allclose(new["b"], torch.tensor([0.5 - 0.3]))
    assert torch.equal(global_state["w"], torch.tensor([1.0, 2.0]))  # input untouched


def test_fedavg_accumulators_reset_each_round():
    state = {"w": torch.zeros(1)}
    strategy = FedAvg()
    strategy.begin_round(state)
    strategy.accumulate({"w": torch.ones(1)}, 5)
    state = strategy.finish_round(state)
    strategy.begin_round(state)
    strategy.accumulate({"w": torch.full((1,), 3.0)}, 1)
    assert torch.equal(strategy.finish_round(state)["w"], torch.tensor([4.0]))


def test_an_empty_round_is_refused_not_averaged():
    strategy = FedAvg()
    strategy.begin_round({"w": torch.zeros(1)})
    with pytest.raises(EmptyRoundError):
        strategy.finish_round({"w": torch.zeros(1)})
    with pytest.raises(ValueError, match="num-examples must be positive"):
        strategy.accumulate({"w": torch.ones(1)}, 0)


def test_strategies_are_selected_by_name():
    assert isinstance(build_strategy("fedavg"), FedAvg)
    assert STRATEGIES["fedavg"] is FedAvg
    with pytest.raises(ValueError, match="unknown strategy"):
        build_strategy("nope")


def test_the_result_does_not_depend_on_reply_order():
    # Replies arrive in any order; a run must still be reproducible to the bit.
    g = torch.Generator().manual_seed(1)
    state = {"w": torch.randn(1000, generator=g)}
    updates = [({"w": torch.randn(1000, generator=g) * 10**k}, 7 + k) for k in range(-3, 4)]
    results = []
    for order in (updates, updates[::-1], updates[3:] + updates[:3]):
        strategy = FedAvg()
        strategy.begin_round(state)
        for delta, n in order:
            strategy.accumulate(delta, n)
        results.append(strategy.finish_round(state)["w"])
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
