"""SCAFFOLD (control variates) and FedNova (normalised averaging): the server's and
the sites' arithmetic by hand on tensors and a tiny model, the refusals, and (slow)
the control variates across a checkpoint and resume."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from flwr.app import ConfigRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity
from inprocess_grid import Transport

from fedelta import deltas, protocol
from fedelta.build import build_strategy
from fedelta.client.session import SiteState
from fedelta.compatibility import check_config
from fedelta.config import ConfigError, RunConfig
from fedelta.errors import InvalidUpdateError
from fedelta.lora import A_SUFFIX, B_SUFFIX
from fedelta.server.checkpoint import load_checkpoint
from fedelta.server.federation import Federation
from fedelta.server.metrics import MetricsLog
from fedelta.simulations import federate
from fedelta.strategies.capabilities import format_optimizer_matrix, optimizer_matrix
from fedelta.strategies.optimizers import (
    ControlVariateCorrection,
    ControlVariates,
    control_variate_change,
)
from fedelta.training import StepHooks, train

A, B = "m" + A_SUFFIX, "m" + B_SUFFIX
RANK = 8


def config(**overrides: Any) -> RunConfig:
    return RunConfig().replace(**overrides)


class Quadratic(torch.nn.Module):
    """A site's loss ``0.5 * ||w - t||^2`` over the adapter tensors ``A`` and ``B``
    (gradient ``w - t``): option II's estimate is exact arithmetic on it."""

    def __init__(self, start: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.names = list(start)
        self.weights = torch.nn.ParameterList([torch.nn.Parameter(start[k].clone()) for k in start])

    def named_parameters(self, *args: Any, **kwargs: Any):  # the adapter's names
        return iter(zip(self.names, self.weights, strict=True))

    def forward(self, **target: torch.Tensor) -> SimpleNamespace:
        pairs = zip(self.names, self.weights, strict=True)
        loss = sum(0.5 * (w - target[k]).pow(2).sum() for k, w in pairs)
        return SimpleNamespace(loss=loss)

    def state(self) -> dict[str, torch.Tensor]:
        return {k: w.detach().clone() for k, w in zip(self.names, self.weights, strict=True)}


def _start() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {A: torch.randn(RANK, 3, generator=g), B: torch.randn(4, RANK, generator=g)}


def _targets(n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        {A: torch.randn(RANK, 3, generator=g), B: torch.randn(4, RANK, generator=g)}
        for _ in range(n)
    ]


def _local(start, target, steps, lr, control=None):
    """``steps`` plain-SGD steps of one site; returns ``y`` and option II's change."""
    model = Quadratic(start)
    hook = None if control is None else StepHooks(ControlVariateCorrection(control))
    sgd = torch.optim.SGD(list(model.parameters()), lr=lr)
    train(model, [target] * steps, lr=lr, optimizer=sgd, hook=hook)
    trained = model.state()
    change = None if control is None else control_variate_change(start, trained, control, steps, lr)
    return trained, change


def _federate(optimizer: str, targets, rounds: int, steps: int, lr: float, population=None):
    """Every site every round, as the round loop drives a strategy; returns the global
    states and the strategy."""
    strategy = build_strategy(config(**{"strategy.optimizer": optimizer}))
    state = _start()
    site_c: dict[str, dict[str, torch.Tensor]] = {}
    states = [state]
    for r in range(1, rounds + 1):
        strategy.begin_round(r, state, ranks=[RANK] * len(targets), population=population)
        for i, target in enumerate(targets):
            site = f"client-{i}"
            extras, instructions = strategy.site_downlink(site)
            control = None
            if protocol.CONTROL in extras:
                own = site_c.get(site) or {k: torch.zeros_like(v) for k, v in state.items()}
                control = ControlVariates(extras[protocol.CONTROL], own)
            trained, change = _local(state, target, steps, lr, control)
            if change is not None:
                site_c[site] = {k: own[k] + change[k] for k in change}
            delta = {k: trained[k] - state[k] for k in state}
            strategy.observe_reply(site, steps, {protocol.CONTROL_DELTA: change} if change else {})
            strategy.accumulate(delta, 10.0, RANK)
        state = strategy.finish_round(state)
        states.append(state)
    return states, strategy, site_c


# -- SCAFFOLD ------------------------------------------------------------------------------
def test_scaffold_with_zero_variates_equals_fedavg_exactly():
    """Round 1 (c = c_i = 0), one local SGD step, every site: the same global state bit
    for bit; with one step, equal weights and full participation the corrections cancel
    in the mean at every later round too (to rounding)."""
    targets = _targets(3)
    scaffold, _, _ = _federate("scaffold", targets, rounds=3, steps=1, lr=0.1)
    fedavg, _, _ = _federate("fedavg", targets, rounds=3, steps=1, lr=0.1)
    for k in scaffold[1]:
        assert torch.equal(scaffold[1][k], fedavg[1][k]), k
    for a, b in zip(scaffold[2:], fedavg[2:], strict=True):
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_option_ii_by_hand_on_a_tiny_model():
    """K SGD steps with the correction: c_i+ = c_i - c + (x - y) / (K lr), which on a
    quadratic is the mean of the raw gradients along the corrected path; the server
    moves c by sum(delta_c) / N and keeps each site's c_i + delta_c."""
    x, (target,) = _start(), _targets(1)
    g = torch.Generator().manual_seed(2)
    c = {k: torch.randn(v.shape, generator=g) for k, v in x.items()}
    c_i = {k: torch.randn(v.shape, generator=g) for k, v in x.items()}
    steps, lr = 3, 0.05
    y, change = _local(x, target, steps, lr, ControlVariates(c, c_i))
    # SGD by hand: w <- w - lr * (g(w) + c - c_i), g(w) = w - t.
    w, grads = {k: v.clone() for k, v in x.items()}, []
    for _ in range(steps):
        grad = {k: w[k] - target[k] for k in w}
        grads.append(grad)
        w = {k: w[k] - lr * (grad[k] + c[k] - c_i[k]) for k in w}
    for k in x:
        torch.testing.assert_close(y[k], w[k])
        new = c_i[k] + change[k]
        torch.testing.assert_close(new, c_i[k] - c[k] + (x[k] - y[k]) / (steps * lr))
        torch.testing.assert_close(new, sum(gr[k] for gr in grads) / steps, rtol=1e-4, atol=1e-5)

    # The server: two of four sites reply; c moves by (dc_0 + dc_1) / 4.
    targets = _targets(2)
    states, strategy, site_c = _federate(
        "scaffold", targets, rounds=2, steps=3, lr=lr, population=4
    )
    opt = strategy.optimizer
    expected_c = {k: sum(site_c[s][k] for s in site_c) / 4 for k in x}
    for k in x:
        # c starts at 0 and every site's c_i at 0, so c = sum_i c_i / N after any rounds.
        torch.testing.assert_close(opt.control[k], expected_c[k])
        for site in site_c:
            assert torch.equal(opt.site_controls[site][k], site_c[site][k])
    assert opt.site_rounds == {"client-0": 2, "client-1": 2}


def test_scaffold_state_dict_restores_every_variate_and_resends_them():
    _, strategy, site_c = _federate("scaffold", _targets(2), rounds=2, steps=2, lr=0.1)
    tensors, meta = strategy.state_dict()
    fresh = build_strategy(config(**{"strategy.optimizer": "scaffold"}))
    fresh.load_state_dict(tensors, meta)
    opt, new = strategy.optimizer, fresh.optimizer
    assert new.site_rounds == opt.site_rounds
    for k in opt.control:
        assert torch.equal(new.control[k], opt.control[k])
    # Before the resume every site held its own c_i; after it, each is sent its copy.
    strategy.begin_round(3, _start(), ranks=[RANK, RANK])
    assert protocol.SITE_CONTROL not in strategy.site_downlink("client-0")[0]
    fresh.begin_round(3, _start(), ranks=[RANK, RANK])
    extras, instructions = fresh.site_downlink("client-0")
    assert instructions == {protocol.CONTROL_ROUND: 2}
    for k, v in extras[protocol.SITE_CONTROL].items():
        assert torch.equal(v, site_c["client-0"][k])


def test_a_site_takes_the_servers_copy_and_refuses_a_stale_one_of_its_own():
    c = {A: torch.ones(2)}
    mine = {A: torch.full((2,), 3.0)}

    def message(held_round: int, sent: dict | None = None) -> RecordDict:
        content = RecordDict({protocol.CONTROL: deltas.encode(c)})
        content[protocol.STRATEGY] = ConfigRecord({protocol.CONTROL_ROUND: held_round})
        if sent is not None:
            content[protocol.SITE_CONTROL] = deltas.encode(sent)
        return content

    fresh = SiteState()
    assert torch.equal(fresh.control_variates(message(0), "s").site[A], torch.zeros(2))
    assert torch.equal(fresh.control_variates(message(2, mine), "s").site[A], mine[A])
    with pytest.raises(RuntimeError, match="round 2"):
        fresh.control_variates(message(2), "s")
    kept = SiteState(control=mine, control_round=2)
    assert torch.equal(kept.control_variates(message(2), "s").site[A], mine[A])
    with pytest.raises(RuntimeError):
        SiteState(control=mine, control_round=1).control_variates(message(2), "s")
    # The node state keeps c_i and its round.
    record = RecordDict()
    kept.save(record)
    loaded = SiteState.load(record)
    assert loaded.control_round == 2 and torch.equal(loaded.control[A], mine[A])
    assert SiteState().control_variates(RecordDict(), "s") is None


# -- FedNova -------------------------------------------------------------------------------
def test_fednova_normalises_by_hand():
    """d = sum p_i D_i / tau_i, tau_eff = sum p_i tau_i, x + lr * tau_eff * d."""
    strategy = build_strategy(
        config(**{"strategy.optimizer": "fednova", "strategy.server-lr": 0.5})
    )
    x = {A: torch.zeros(RANK, 2), B: torch.ones(3, RANK)}
    g = torch.Generator().manual_seed(3)
    replies = [
        ({k: torch.randn(v.shape, generator=g) for k, v in x.items()}, w, tau)
        for w, tau in ((10.0, 2), (30.0, 5), (60.0, 1))
    ]
    strategy.begin_round(1, x, ranks=[RANK] * 3)
    for i, (delta, w, tau) in enumerate(replies):
        strategy.observe_reply(f"s{i}", tau, {})
        strategy.accumulate(delta, w, RANK)
    new = strategy.finish_round(x)
    total = sum(w for _, w, _ in replies)
    tau_eff = sum(w * tau for _, w, tau in replies) / total
    for k in x:
        d = sum(w / total * delta[k] / tau for delta, w, tau in replies)
        torch.testing.assert_close(new[k], x[k] + 0.5 * tau_eff * d)
    assert tau_eff == pytest.approx((20 + 150 + 60) / 100)


def test_fednova_equals_fedavg_when_every_site_takes_the_same_steps():
    targets = _targets(3)
    nova, _, _ = _federate("fednova", targets, rounds=2, steps=3, lr=0.1)
    avg, _, _ = _federate("fedavg", targets, rounds=2, steps=3, lr=0.1)
    for a, b in zip(nova, avg, strict=True):
        for k in a:
            torch.testing.assert_close(a[k], b[k])


def test_fednova_rejects_a_reply_without_its_step_count():
    strategy = build_strategy(config(**{"strategy.optimizer": "fednova"}))
    x = {A: torch.zeros(RANK, 2)}
    strategy.begin_round(1, x, ranks=[RANK])
    strategy.observe_reply("s", None, {})
    with pytest.raises(InvalidUpdateError, match="train-steps"):
        strategy.accumulate({A: torch.ones(RANK, 2)}, 1.0, RANK)


# -- what cannot be combined ---------------------------------------------------------------
SECAGG = {"privacy.secure-aggregation": True, "min-train-nodes": 3, "min-available-nodes": 3}
DP_SGD = {"privacy.dp-sgd": True, "privacy.noise-multiplier": 1.0}
CLIENT_DP = {"privacy.client-dp": "central", "privacy.client-noise-multiplier": 1.0}


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"strategy.optimizer": "scaffold", **SECAGG}, "strategy.optimizer"),
        ({"strategy.optimizer": "fednova", **SECAGG}, "strategy.optimizer"),
        ({"strategy.optimizer": "scaffold", **DP_SGD}, "strategy.optimizer"),
        ({"strategy.optimizer": "scaffold", **CLIENT_DP}, "strategy.optimizer"),
        ({"strategy.optimizer": "fednova", "local-steps": 0, **CLIENT_DP}, "local-steps"),
        ({"strategy.optimizer": "scaffold", "lora.client-ranks": "4,8"}, "lora.client-ranks"),
        (
            {"strategy.optimizer": "scaffold", "compression.half-finetuning": True},
            "compression.half-finetuning",
        ),
    ],
)
def test_refusals_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        check_config(config(**overrides))


def test_what_scaffold_and_fednova_may_be_combined_with():
    check_config(config(**{"strategy.optimizer": "fednova", **CLIENT_DP}))
    check_config(config(**{"strategy.optimizer": "scaffold", "compression.sparsity": "top-k"}))
    check_config(config(**{"strategy.optimizer": "scaffold", "optim": "sgd"}))
    assert not build_strategy(config(**{"strategy.optimizer": "scaffold"})).capabilities.linear
    assert build_strategy(config()).capabilities.linear


def test_the_optimizer_matrix_is_in_the_docs():
    docs = (Path(__file__).parents[1] / "docs" / "strategies.md").read_text(encoding="utf-8")
    assert format_optimizer_matrix(optimizer_matrix()) in docs


# -- whole runs: the in-process engine and the round loop over Flower's serialization -----
@pytest.fixture
def scaffold_config(tiny_config: RunConfig, tiny_bert: str, monkeypatch) -> RunConfig:
    """Two sites, one plain-SGD step each per round, a tiny BERT, no federated evaluation."""
    for key, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", SUPERLINK_NODE_ID)):
        monkeypatch.setattr(TaskIdentity, key, value)
    return tiny_config.replace(
        **{
            "local-steps": 1,
            "fraction-evaluate": 0.0,
            "model.name": tiny_bert,
            "optim": "sgd",
            "sgd-momentum": 0.0,
            "strategy.optimizer": "scaffold",
        }
    )


@pytest.mark.slow
def test_scaffold_run_with_one_sgd_step_equals_fedavg_in_round_one(scaffold_config):
    config = scaffold_config.replace(**{"num-server-rounds": 1})
    scaffold = federate(config).states[1]
    fedavg = federate(config.replace(**{"strategy.optimizer": "fedavg"})).states[1]
    for k, v in fedavg.items():
        assert torch.equal(scaffold[k], v), k


@pytest.mark.slow
def test_control_variates_survive_a_kill_and_resume_exactly(scaffold_config, tmp_path):
    """A straight 3-round run against one stopped after round 2 and resumed on new nodes
    (fresh node states, as after a crash): the same global state, c and every c_i, bit
    for bit; the resumed round sends each site its c_i, the straight one does not; the
    ledger counts c down and delta_c up."""
    config = scaffold_config.replace(**{"num-server-rounds": 3, "local-steps": 2})

    def run(cfg: RunConfig, transport: Transport, resume: bool = False) -> list[dict]:
        Federation(transport, cfg, Path(cfg.output_dir), resume=resume, progress=False).run()
        return MetricsLog(Path(cfg.output_dir)).rows()

    straight = Transport(2)
    rows = run(config.replace(output_dir=str(tmp_path / "straight")), straight)
    split = config.replace(output_dir=str(tmp_path / "split"))
    run(split.replace(**{"num-server-rounds": 2}), Transport(2))
    second = Transport(2)
    run(split.replace(resume=True), second, resume=True)

    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "split")
    assert a.server_round == b.server_round == 3
    assert a.global_state.keys() == b.global_state.keys()
    for name, tensor in a.global_state.items():
        assert torch.equal(b.global_state[name], tensor), name
    assert a.strategy_tensors.keys() == b.strategy_tensors.keys()
    assert any(k.startswith("site-control/client-1/") for k in a.strategy_tensors)
    for name, tensor in a.strategy_tensors.items():
        assert torch.equal(b.strategy_tensors[name], tensor), name

    def sent_site_control(transport: Transport, server_round: int) -> list[bool]:
        return [
            protocol.SITE_CONTROL in c.message.content.array_records
            for c in transport.carried
            if c.direction == "down"
            and c.group_id == str(server_round)
            and c.message_type == "train"
        ]

    assert sent_site_control(straight, 3) == [False, False]
    assert sent_site_control(second, 3) == [True, True]
    # Each site's node state holds the c_i the server checkpointed for it.
    for context in straight.contexts.values():
        site = straight.site_of[context.node_id]
        own = deltas.decode(context.state.array_records[protocol.LOCAL_CONTROL])
        for k, v in own.items():
            assert torch.equal(a.strategy_tensors[f"site-control/{site}/{k}"], v)
    # c goes down and delta_c up beside the adapter and the delta: each at least as
    # many bytes as the dense delta, counted in the ledger (the round's dense count too).
    # Round 2: in round 1 c is zeros, which Flower's content-addressed chunks send once.
    fedavg_dir = tmp_path / "fedavg"
    fedavg = run(
        config.replace(
            **{
                "strategy.optimizer": "fedavg",
                "output-dir": str(fedavg_dir),
                "num-server-rounds": 2,
            }
        ),
        Transport(2),
    )
    dense = fedavg[2]["dense-fp32-bytes-up"] / 2
    assert rows[2]["dense-fp32-bytes-up"] == 2 * fedavg[2]["dense-fp32-bytes-up"]
    for site, up in rows[2]["bytes-up-by-site"].items():
        assert up - fedavg[2]["bytes-up-by-site"][site] >= dense, site
        down = rows[2]["bytes-down-by-site"][site]
        assert down - fedavg[2]["bytes-down-by-site"][site] >= dense, site
