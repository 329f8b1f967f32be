"""Differential privacy and secure aggregation: real Opacus on the real MiniLM, Flower's
SecAgg+ through real Flower simulations."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import bytes_to_ndarray
from inprocess_grid import Transport
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from opacus.accountants.utils import get_noise_multiplier

from fedelta.build import build_strategy
from fedelta.client import app as client_app
from fedelta.client.trainer import ClientTrainer
from fedelta.compatibility import check_config
from fedelta.config import ConfigError, PrivacyConfig, RunConfig, load_config
from fedelta.data import load_client_data
from fedelta.models import adapter_state
from fedelta.privacy.accounting import PrivacyAccountant, PrivacyBudgetError
from fedelta.privacy.client_level import add_noise_share
from fedelta.privacy.dp_sgd import DPTrainingError, train_private
from fedelta.privacy.noise import noise_generator
from fedelta.protocol import Site
from fedelta.server.checkpoint import load_checkpoint
from fedelta.server.federation import Federation
from fedelta.simulations import simulate
from fedelta.strategies import DeltaStrategy
from fedelta.strategies.aggregators.client_dp import ClientLevelDP
from fedelta.strategies.base import EmptyRoundError
from fedelta.tensors import densify

DELTA = 1e-5


@pytest.fixture
def dp_config(tiny_config) -> RunConfig:
    return tiny_config.replace(
        **{
            "local-steps": 3,
            "privacy.dp-sgd": True,
            "privacy.noise-multiplier": 1.1,
            "privacy.seeded-noise": True,
        }
    )


def _trainer(config: RunConfig, partition: int = 0, partitions: int = 2) -> ClientTrainer:
    return ClientTrainer(config, Site(partition, partitions, f"client-{partition}"))


def _train_loss(trainer: ClientTrainer) -> float:
    """Loss of the loaded model on the site's own training examples."""
    loader = trainer.task.make_loader(
        trainer.data.train.select(range(128)), trainer.tokenizer, 32, train=False
    )
    return trainer.task.evaluate(trainer.model, loader).loss


def _composed_epsilon(mechanisms: Sequence[tuple[float, float, int]]) -> float:
    """Epsilon at ``DELTA`` of running the (noise, rate, steps) mechanisms one after the
    other: their RDP curves add up. Opacus' analysis directly (over its accountant's
    default orders), not fedelta's accountant."""
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = sum(
        compute_rdp(q=q, noise_multiplier=z, steps=n, orders=orders) for z, q, n in mechanisms
    )
    return float(get_privacy_spent(orders=orders, rdp=rdp, delta=DELTA)[0])


def _rdp_epsilon(noise_multiplier: float, sample_rate: float, steps: int) -> float:
    """Epsilon at ``DELTA`` of ``steps`` subsampled Gaussian steps."""
    return _composed_epsilon([(noise_multiplier, sample_rate, steps)])


# -- DP-SGD ------------------------------------------------------------------------------
@pytest.mark.training
def test_dp_sgd_canary_every_tensor_trains_and_the_loss_goes_down(dp_config):
    """Opacus issue 820: DP-LoRA can train 'normally' and leave adapters unusable. Here
    every LoRA factor and the head must move in every round, and the model must fit."""
    config = dp_config.replace(
        **{"local-steps": 12, "batch-size": 16, "lr": 5e-3, "privacy.noise-multiplier": 0.5}
    )
    trainer = _trainer(config)
    state = trainer.receive(adapter_state(trainer.model), {}, {})
    before = _train_loss(trainer)
    accountant = PrivacyAccountant()
    for server_round in (1, 2):
        start = trainer.receive(state, {}, {})
        out = trainer.fit(start, server_round, accountant=accountant)
        state = adapter_state(trainer.model)
        unchanged = [k for k in start if torch.equal(state[k], start[k])]
        assert unchanged == [], f"round {server_round}: DP-SGD left {unchanged} untouched"
        assert all(any(part in k for k in start) for part in ("lora_A", "lora_B", "classifier"))
        assert out.private is not None and out.private.epsilon > 0
    assert not any(hasattr(p, "grad_sample") for p in trainer.model.parameters())
    after = _train_loss(trainer)
    assert after < before - 0.02, (before, after)


@pytest.mark.training
def test_dp_sgd_off_takes_the_plain_path(tiny_config, monkeypatch):
    """Privacy settings without dp-sgd change nothing: the same upload, bit for bit."""
    import fedelta.client.trainer as trainer_module

    def must_not_run(*args, **kwargs):
        raise AssertionError("DP-SGD ran with privacy.dp-sgd off")

    plain = _trainer(tiny_config)
    start = plain.receive(adapter_state(plain.model), {}, {})
    expected = plain.fit(start, 1).upload
    monkeypatch.setattr(trainer_module, "train_private", must_not_run)
    quiet = tiny_config.replace(**{"privacy.noise-multiplier": 1.0, "privacy.target-epsilon": 3.0})
    other = _trainer(quiet)
    got = other.fit(other.receive(start, {}, {}), 1).upload
    assert sorted(got.keys()) == sorted(expected.keys())
    for key in expected.keys():
        assert np.array_equal(got[key].numpy(), expected[key].numpy()), key


@pytest.mark.training
def test_reported_epsilon_equals_opacus_accountant(dp_config):
    trainer = _trainer(dp_config)
    accountant = PrivacyAccountant()
    state = adapter_state(trainer.model)
    outs = []
    for server_round in (1, 2):
        outs.append(
            trainer.fit(trainer.receive(state, {}, {}), server_round, accountant=accountant)
        )
    private = outs[-1].private
    assert private.noise_multiplier == 1.1
    # Poisson sampling at about batch-size / examples.
    assert private.sample_rate == pytest.approx(8 / len(trainer.data.train), rel=0.02)
    opacus = RDPAccountant()
    for _ in range(2 * 3):
        opacus.step(noise_multiplier=1.1, sample_rate=private.sample_rate)
    assert private.epsilon == pytest.approx(opacus.get_epsilon(DELTA), rel=1e-12)
    assert outs[0].private.epsilon < private.epsilon


@pytest.mark.training
def test_a_site_past_its_budget_refuses_before_training(dp_config):
    """target-epsilon with a derived noise: all rounds fit the budget, one more does not."""
    config = dp_config.replace(
        **{"privacy.noise-multiplier": 0.0, "privacy.target-epsilon": 2.0, "num-server-rounds": 1}
    )
    trainer = _trainer(config)
    accountant = PrivacyAccountant()
    state = adapter_state(trainer.model)
    first = trainer.fit(trainer.receive(state, {}, {}), 1, accountant=accountant)
    assert 1.99 - 0.01 <= first.private.epsilon <= 2.0
    start = trainer.receive(adapter_state(trainer.model), {}, {})
    with pytest.raises(PrivacyBudgetError, match=r"privacy budget spent: epsilon [\d.]+ of 2 used"):
        trainer.fit(start, 2, accountant=accountant)
    assert all(torch.equal(v, start[k]) for k, v in adapter_state(trainer.model).items())
    assert accountant.epsilon(DELTA) == first.private.epsilon


def test_a_site_takes_over_the_servers_ledger_after_a_resume():
    """Node states last one run: after a resume a site's own accountant is empty, and the
    server's checkpointed ledger of what it reported is what it has spent."""
    ledger = PrivacyAccountant()
    ledger.spend(1.1, 0.01, 25)
    ledger.spend(1.1, 0.01, 25)
    assert ledger.history == [(1.1, 0.01, 50)]
    sent = PrivacyAccountant.from_record(ledger.to_record())
    fresh = PrivacyAccountant()
    assert fresh.at_least(sent, DELTA).history == ledger.history
    assert ledger.at_least(PrivacyAccountant([(1.1, 0.01, 10)]), DELTA) is ledger
    assert PrivacyAccountant.from_meta(ledger.to_meta()).epsilon(DELTA) == ledger.epsilon(DELTA)


@pytest.mark.training
def test_an_empty_poisson_batch_is_still_a_noised_accounted_step(dp_config):
    trainer = _trainer(dp_config)
    examples = trainer.task.examples(
        trainer.data.train.select(range(4)), trainer.tokenizer, train=True
    )
    collate = trainer.task.collate_fn(trainer.tokenizer)
    drawn = []

    def counting(batch):
        drawn.append(len(batch))
        return collate(batch)

    start = adapter_state(trainer.model)
    torch.manual_seed(0)
    accountant = PrivacyAccountant()
    out = train_private(
        trainer.model,
        trainer.task,
        examples,
        counting,
        batch_size=1,
        steps=12,
        rounds=1,
        lr=1e-3,
        weight_decay=0.0,
        settings=dp_config.privacy,
        accountant=accountant,
        seed_parts=(1,),
    )
    assert len(drawn) < 12, "no empty batch drawn; pick another seed"
    assert accountant.history == [(1.1, 0.25, 12)]
    after = adapter_state(trainer.model)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert not all(torch.equal(after[k], start[k]) for k in start)
    assert out.result.steps == 12


@pytest.mark.training
def test_parameters_without_true_per_example_gradients_are_refused(dp_config):
    """BERT's position embeddings are added once for the whole batch: Opacus would clip
    their gradient as one example's. Training stops and names them."""
    trainer = _trainer(dp_config.replace(**{"model.finetuning": "full"}))
    positions = next(
        p for n, p in trainer.model.named_parameters() if n.endswith("position_embeddings.weight")
    )
    examples = trainer.task.examples(
        trainer.data.train.select(range(32)), trainer.tokenizer, train=True
    )
    positions.requires_grad_(True)
    try:
        with pytest.raises(DPTrainingError, match="position_embeddings"):
            train_private(
                trainer.model,
                trainer.task,
                examples,
                trainer.task.collate_fn(trainer.tokenizer),
                batch_size=8,
                steps=1,
                rounds=1,
                lr=1e-3,
                weight_decay=0.0,
                settings=dp_config.privacy,
                accountant=PrivacyAccountant(),
                seed_parts=(1,),
            )
    finally:
        positions.requires_grad_(False)
    assert not any(hasattr(p, "grad_sample") for p in trainer.model.parameters())


@pytest.mark.training
def test_dp_sgd_on_a_causal_lm_trains_every_adapter_with_per_chat_losses(chat_config):
    config = chat_config.replace(
        **{
            "local-steps": 2,
            "privacy.dp-sgd": True,
            "privacy.noise-multiplier": 0.8,
            "privacy.seeded-noise": True,
        }
    )
    trainer = _trainer(config, 0, 3)
    chats = trainer.task.examples(
        trainer.data.train.select(range(3)), trainer.tokenizer, train=True
    )
    collate = trainer.task.collate_fn(trainer.tokenizer)
    with torch.no_grad():
        # One chat: its own token mean is Hugging Face's loss; several: a mean of means.
        one = collate(chats[:1])
        assert trainer.task.example_mean_loss(trainer.model, one).item() == pytest.approx(
            trainer.model(**one).loss.item(), rel=1e-5
        )
        each = [trainer.task.example_mean_loss(trainer.model, collate([c])) for c in chats]
        joint = trainer.task.example_mean_loss(trainer.model, collate(chats))
        assert joint.item() == pytest.approx(torch.stack(each).mean().item(), rel=1e-4)
    start = trainer.receive(adapter_state(trainer.model), {}, {})
    out = trainer.fit(start, 1, accountant=PrivacyAccountant())
    after = adapter_state(trainer.model)
    assert [k for k in start if torch.equal(after[k], start[k])] == []
    assert out.private.epsilon > 0


# -- client-level DP ---------------------------------------------------------------------
def _settings(**overrides) -> PrivacyConfig:
    base = {"client_dp": "central", "client_clip_norm": 1.0, "client_noise_multiplier": 2.0}
    return PrivacyConfig(**{**base, "seeded_noise": True, **overrides})


def _norm(update: Mapping[str, torch.Tensor]) -> float:
    """L2 norm over all of an update's tensors."""
    return math.sqrt(sum(float((v.double() ** 2).sum()) for v in update.values()))


def _clipped_mean(
    updates: Sequence[Mapping[str, torch.Tensor]], clip_norm: float, sampled: int
) -> dict[str, torch.Tensor]:
    """DP-FedAvg's signal, in float64 and independently of fedelta: each update scaled to
    L2 norm at most ``clip_norm`` (one norm over all its tensors), summed with equal
    weights and divided by the ``sampled`` sites (replied or not)."""
    total: dict[str, torch.Tensor] = {}
    for update in updates:
        scale = min(1.0, clip_norm / _norm(update))
        for k, v in update.items():
            total[k] = total.get(k, 0.0) + scale * v.double()
    return {k: v / sampled for k, v in total.items()}


def _assert_exact(
    got: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    atol: float,
    rtol: float = 1e-5,
) -> None:
    """Equal up to float32 arithmetic (``rtol``) and ``atol``, tensor by tensor."""
    assert sorted(got) == sorted(expected)
    for k, v in expected.items():
        torch.testing.assert_close(got[k].double(), v, rtol=rtol, atol=atol, msg=k)


def _assert_gaussian_noise(
    got: Mapping[str, torch.Tensor], signal: Mapping[str, torch.Tensor], std: float
) -> None:
    """``got - signal`` is zero-mean noise of ``std``: the sample std within 2% (over
    enough coordinates that 2% is many standard errors), the mean within 5 standard
    errors of zero."""
    residual = torch.cat([(got[k].double() - v).ravel() for k, v in sorted(signal.items())])
    n = residual.numel()
    assert n >= 50_000, f"{n} coordinates: too few to pin the std to 2%"
    assert residual.std().item() == pytest.approx(std, rel=0.02)
    assert abs(residual.mean().item()) < 5 * std / math.sqrt(n)


def _central_round(noise_multiplier: float) -> tuple[dict[str, torch.Tensor], ClientLevelDP]:
    """Central DP over 2 replies of the 4 sites sampled: one update above the clip
    norm, one below, each with a different value in every coordinate."""
    dp = ClientLevelDP(_settings(client_noise_multiplier=noise_multiplier), rounds=3, seed=0)
    dp.sampling(4, 10)
    dp.begin(1)
    dp.add(UPDATES[0], 1.0)
    dp.add(UPDATES[1], 1.0)
    with pytest.raises(ValueError, match="one site per update"):
        dp.add(UPDATES[1], 500.0)  # an example count: the bound on one site would not hold
    return dp.result(), dp


_rng = torch.Generator().manual_seed(0)
UPDATES = [
    # Norm about 4.6: clipped to 1. Norm about 0.46: kept. A value of its own in every
    # coordinate, around a mean (0.01, 0.001) that a lost or misweighted update moves.
    {"w": 0.01 + 0.002 * torch.randn(200_000, generator=_rng)},
    {"w": 0.001 + 0.0002 * torch.randn(200_000, generator=_rng)},
]


@pytest.mark.filterwarnings("ignore:Optimal order is the")
def test_central_client_dp_clips_weighs_equally_and_adds_the_right_noise():
    # Fixed denominator: the 4 sampled sites, of which 2 replied.
    expected = _clipped_mean(UPDATES, 1.0, 4)
    assert _norm(UPDATES[0]) > 4 and _norm(UPDATES[1]) < 0.5
    # Noise off (z tiny: the config needs z > 0): exactly the clipped mean.
    quiet, dp = _central_round(1e-12)
    _assert_exact(quiet, expected, atol=1e-9)
    assert dp.metrics()["clients-clipped"] == 1.0
    # Noise on: std z C / m. With z = 0.1, 5 standard errors of the noise's mean (3e-4)
    # are well below what an unclipped mean (+2e-3), a mean over the replies (+8e-4) or
    # no signal (-8e-4) would shift it by.
    noised, _ = _central_round(0.1)
    _assert_gaussian_noise(noised, expected, 0.1 * 1.0 / 4)


def test_distributed_noise_shares_sum_to_the_central_mechanism():
    generator = torch.Generator().manual_seed(0)
    m = 16
    shares = [
        add_noise_share({"w": torch.zeros(100_000)}, 0.5, 3.0, m, generator)[0]["w"]
        for _ in range(m)
    ]
    assert shares[0].std().item() == pytest.approx(3.0 * 0.5 / math.sqrt(m), rel=0.01)
    assert sum(shares).std().item() == pytest.approx(3.0 * 0.5, rel=0.01)
    clipped, scaled = add_noise_share({"w": torch.full((4,), 10.0)}, 0.5, 0.0, 1, generator)
    assert scaled and torch.linalg.vector_norm(clipped["w"]).item() == pytest.approx(0.5)


def _central_noise(seeded: bool) -> torch.Tensor:
    """The noise central client-level DP adds to a zero update (run seed 0, round 1)."""
    dp = ClientLevelDP(_settings(seeded_noise=seeded), rounds=1, seed=0)
    dp.sampling(1, 1)
    dp.begin(1)
    dp.add({"w": torch.zeros(1000)}, 1.0)
    return dp.result()["w"]


def _noise_share(seeded: bool) -> torch.Tensor:
    """A site's distributed noise share, from the generator the trainer asks for."""
    generator = noise_generator(seeded, 42, 7, 2)
    return add_noise_share({"w": torch.zeros(1000)}, 1.0, 1.0, 1, generator)[0]["w"]


def _dp_sgd_weights(seeded: bool) -> torch.Tensor:
    """A linear model after 2 DP-SGD steps from the same start. The batch is the whole
    data set (Poisson sampling at rate 1 draws every example), so only the noise can
    make two runs differ."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 2)
    examples = [{"x": torch.randn(8), "y": torch.tensor(i % 2)} for i in range(16)]

    def collate(batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {k: torch.stack([e[k] for e in batch]) for k in ("x", "y")}

    class Task:
        @staticmethod
        def example_mean_loss(module: torch.nn.Module, batch: dict[str, torch.Tensor]):
            return torch.nn.functional.cross_entropy(module(batch["x"]), batch["y"])

    train_private(
        model,
        Task(),
        examples,
        collate,
        batch_size=len(examples),
        steps=2,
        rounds=1,
        lr=0.1,
        weight_decay=0.0,
        settings=PrivacyConfig(dp_sgd=True, noise_multiplier=1.0, seeded_noise=seeded),
        accountant=PrivacyAccountant(),
        seed_parts=(3,),
    )
    return model.weight.detach().clone()


@pytest.mark.parametrize("draw", [_central_noise, _noise_share, _dp_sgd_weights])
def test_unseeded_noise_differs_between_identical_runs_and_seeded_noise_repeats(draw):
    """Off by default: noise anyone with the config could regenerate protects nothing."""
    assert torch.equal(draw(True), draw(True))
    assert not torch.equal(draw(False), draw(False))


def test_client_level_epsilon_is_opacus_rdp_over_rounds_and_survives_a_resume():
    dp = ClientLevelDP(_settings(), rounds=3, seed=0)
    for server_round in (1, 2):
        dp.sampling(3, 10)
        dp.begin(server_round)
        dp.add({"w": torch.ones(4)}, 1.0)
        dp.result()
    resumed = ClientLevelDP(_settings(), rounds=3, seed=0)
    resumed.load_state_dict(dp.state_dict())
    resumed.sampling(3, 10)
    resumed.begin(3)
    resumed.add({"w": torch.ones(4)}, 1.0)
    resumed.result()
    opacus = RDPAccountant()
    for _ in range(3):
        opacus.step(noise_multiplier=2.0, sample_rate=0.3)
    assert resumed.metrics()["client-dp-epsilon"] == pytest.approx(opacus.get_epsilon(DELTA))


def test_client_level_target_epsilon_derives_the_noise():
    dp = ClientLevelDP(
        _settings(client_noise_multiplier=0.0, client_target_epsilon=4.0), rounds=5, seed=0
    )
    for server_round in range(1, 6):
        dp.sampling(2, 8)
        dp.begin(server_round)
        dp.add({"w": torch.ones(4)}, 1.0)
        dp.result()
    assert 3.99 - 0.01 <= dp.metrics()["client-dp-epsilon"] <= 4.0
    assert dp.noise_multiplier > 0


# -- refused combinations -----------------------------------------------------------------
SECURE = {"privacy.secure-aggregation": True, "min-train-nodes": 3, "min-available-nodes": 3}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({**SECURE, "strategy.lora": "fedex"}, "is not linear"),
        ({**SECURE, "strategy.aggregator": "median"}, "is not linear"),
        ({**SECURE, "strategy.aggregator": "ties"}, "is not linear"),
        ({**SECURE, "strategy.clip-norm": 1.0}, "is not linear"),
        ({**SECURE, "compression.sparsity": "top-k"}, "each client sends different coordinates"),
        ({**SECURE, "compression.quantization": "int8"}, "quantizes uploads itself"),
        ({**SECURE, "lora.client-ranks": "4,8"}, "different shapes"),
        ({**SECURE, "max-update-norm": 5.0}, "cannot see one update's norm"),
        (
            {**SECURE, "privacy.client-dp": "central", "privacy.client-noise-multiplier": 1.0},
            'use "distributed"',
        ),
        ({"privacy.secure-aggregation": True}, "with two clients each learns"),
        ({"privacy.dp-sgd": True}, "needs privacy.noise-multiplier or privacy.target-epsilon"),
        (
            {
                "privacy.dp-sgd": True,
                "privacy.target-epsilon": 3.0,
                "strategy.optimizer": "fedprox",
            },
            "proximal term",
        ),
        (
            {
                "privacy.dp-sgd": True,
                "privacy.target-epsilon": 3.0,
                "gradient-accumulation-steps": 2,
            },
            "raise batch-size",
        ),
        (
            {
                "privacy.dp-sgd": True,
                "privacy.target-epsilon": 3.0,
                "compression.sparsity": "spiel",
            },
            "training-time masks",
        ),
        ({"privacy.client-dp": "central"}, "needs privacy.client-noise-multiplier"),
        (
            {
                "privacy.client-dp": "distributed",
                "privacy.client-target-epsilon": 1.0,
                "strategy.lora": "fedex",
            },
            "noise shares adding up",
        ),
        (
            {
                "privacy.client-dp": "central",
                "privacy.client-target-epsilon": 1.0,
                "strategy.aggregator": "krum",
            },
            "needs strategy.aggregator",
        ),
        ({"privacy.delta": 0.0}, "privacy.delta"),
    ],
)
def test_privacy_settings_that_cannot_hold_are_refused_before_training(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        check_config(RunConfig.from_flat(overrides))


def test_secure_aggregation_takes_linear_strategies():
    for lora in ("naive", "ffa", "fedsa"):
        check_config(
            RunConfig.from_flat({**SECURE, "strategy.lora": lora, "strategy.optimizer": "fedadam"})
        )
    check_config(RunConfig.from_flat({**SECURE, "compression.sparsity": "random-mask"}))
    check_config(
        RunConfig.from_flat(
            {**SECURE, "privacy.client-dp": "distributed", "privacy.client-target-epsilon": 3.0}
        )
    )


@pytest.mark.parametrize("name", ["dp-sgd.toml", "client-dp.toml", "secure-aggregation.toml"])
def test_privacy_examples_load(name):
    from pathlib import Path

    config = load_config(Path(__file__).parent.parent / "examples" / name)
    p = config.privacy
    assert p.dp_sgd or p.client_dp != "none" or p.secure_aggregation


# -- SecAgg+ protocol ----------------------------------------------------------------------
@pytest.fixture
def in_process_messages():
    """Flower messages outside a Flower runtime need a task identity; restored after."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


@pytest.mark.parametrize(
    ("leaves_at", "num_shares"),
    [
        (None, 1.0),
        ("setup", 1.0),
        ("share_keys", 1.0),
        ("collect_masked_vectors", 1.0),
        ("unmask", 1.0),
        ("collect_masked_vectors", 3.0),  # each site shares with 2 neighbours only
    ],
)
def test_secagg_protocol_recovers_the_weighted_mean_whichever_stage_a_site_leaves(
    in_process_messages, leaves_at, num_shares
):
    """Five sites with known uploads; site 5 leaves at ``leaves_at``. Before it masked
    anything its upload is simply absent; after sharing keys its pairwise masks are
    rebuilt from its neighbours' shares; if it leaves while unmasking, its upload is
    already in the sum and its own mask is removed with the others' shares."""
    from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    from fedelta import protocol
    from fedelta.privacy.secure_aggregation import (
        SecAggPlus,
        masked_upload,
        secure_aggregation_mod,
    )

    settings = PrivacyConfig(secure_aggregation=True, secagg_num_shares=num_shares)
    rng = np.random.default_rng(0)
    uploads = {
        nid: {
            "a": rng.uniform(-0.5, 0.5, (3, 4)).astype(np.float32),
            "b": rng.uniform(-0.5, 0.5, 7).astype(np.float32),
        }
        for nid in range(1, 6)
    }
    weights = {nid: 100 * nid + 7 for nid in uploads}

    def leave(msg, context, call_next):
        stage = msg.content.config_records["secaggplus_configs"].get("stage")
        if context.node_id == 5 and stage == leaves_at:
            raise RuntimeError(f"site 5 left at {stage}")
        return call_next(msg, context)

    app = ClientApp(mods=[leave, secure_aggregation_mod])

    @app.train()
    def train(msg, context):
        nid = context.node_id
        record = ArrayRecord({k: Array(v) for k, v in uploads[nid].items()})
        content = masked_upload(record, weights[nid], settings)
        content[protocol.METRICS] = MetricRecord({protocol.NUM_EXAMPLES: weights[nid]})
        return Message(content, reply_to=msg)

    contexts = {
        nid: Context(run_id=1, node_id=nid, node_config={}, state=RecordDict(), run_config={})
        for nid in uploads
    }

    def exchange(messages, timeout):
        for msg in messages:
            nid = msg.metadata.dst_node_id
            try:
                yield nid, app(msg, contexts[nid])
            except RuntimeError as err:
                yield nid, Message(Error(code=0, reason=str(err)), reply_to=msg)

    outcome = SecAggPlus(settings).run(exchange, {nid: RecordDict() for nid in uploads}, 1)
    counted = set(uploads) - ({5} if leaves_at not in (None, "unmask") else set())
    assert outcome.contributors == counted
    assert (5 in outcome.failed) == (leaves_at is not None)
    total = sum(weights[n] for n in counted)
    assert outcome.total_weight == pytest.approx(total, rel=1e-4)
    for name in ("a", "b"):
        expected = sum(weights[n] * uploads[n][name] for n in counted) / total
        np.testing.assert_allclose(outcome.mean[name].numpy(), expected, atol=1e-5)


@pytest.mark.parametrize(
    ("sampled", "num_shares", "expected"),
    [(10, 1.0, 10), (10, 0.4, 5), (10, 4.0, 5), (10, 5.0, 5), (3, 0.5, 3), (4, 1.0, 4)],
)
def test_secagg_share_counts_are_odd_neighbourhoods(sampled, num_shares, expected):
    from fedelta.privacy.secure_aggregation import SecAggPlus

    shares, threshold = SecAggPlus(PrivacyConfig(secagg_num_shares=num_shares)).protocol_sizes(
        sampled
    )
    assert shares == expected and 2 <= threshold <= shares


def test_an_upload_outside_the_secagg_range_fails_loudly():
    from flwr.app import Array, ArrayRecord

    from fedelta.privacy.secure_aggregation import masked_upload

    big = ArrayRecord({"lora_B": Array(np.array([0.1, -2.5], dtype=np.float32))})
    with pytest.raises(ValueError, match="2.5 in 'lora_B' exceeds 1 "):
        masked_upload(big, 10, PrivacyConfig())
    # A site with 4x max-weight examples has its upload scaled by 4 before quantizing.
    with pytest.raises(ValueError, match="0.3 in 'lora_B' exceeds 0.25 "):
        masked_upload(
            ArrayRecord({"lora_B": Array(np.array([0.3], dtype=np.float32))}),
            16,
            PrivacyConfig(secagg_max_weight=4),
        )


# -- through Flower ------------------------------------------------------------------------
class RecordingStrategy(DeltaStrategy):
    """The configured strategy, keeping what the server accumulated (per site, or the
    secure sum) and what it combined that into."""

    def __init__(self, config: RunConfig) -> None:
        built = build_strategy(config)
        super().__init__(built.lora, built.optimizer, built.aggregator, built.clip_norm)
        self.received: list[tuple[dict[str, torch.Tensor], float]] = []
        self.combined: list[dict[str, torch.Tensor]] = []
        """Each round's combined update, as the aggregator handed it to the optimizer."""
        result = self.aggregator.result

        def recorded() -> dict[str, torch.Tensor]:
            combined = result()
            self.combined.append({k: v.clone() for k, v in combined.items()})
            return combined

        self.aggregator.result = recorded

    def accumulate(self, delta, num_examples, rank=None):
        self.received.append(({k: v.clone() for k, v in densify(delta).items()}, num_examples))
        super().accumulate(delta, num_examples, rank)


def _losing_power(partition: int) -> ClientApp:
    """fedelta's ClientApp, but the site of ``partition`` crashes while it trains (under
    SecAgg+: after it took part in key sharing, mid-protocol)."""

    def train(msg: Message, context: Context) -> Message:
        if int(context.node_config["partition-id"]) == partition:
            raise RuntimeError(f"site {partition} lost power")
        return client_app.train(msg, context)

    return client_app.with_train(train)


dropping_app = _losing_power(3)


@pytest.mark.slow
def test_secure_aggregation_masks_uploads_and_recovers_fedavg_after_a_dropout(
    tiny_config, tmp_path, monkeypatch
):
    import ray.cloudpickle

    from fedelta.privacy import secure_aggregation

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    config = tiny_config.replace(
        **{
            "fraction-evaluate": 0.0,
            "simulation.num-supernodes": 4,
            "simulation.client-cpus": 1.0,
            "min-train-nodes": 4,
            "min-available-nodes": 4,
        }
    )
    plain = RecordingStrategy(config)
    simulate(config.replace(output_dir=str(tmp_path / "plain")), strategy=plain, progress=False)
    assert len(plain.received) == 4

    masked_uploads: list[list[np.ndarray]] = []
    stage = secure_aggregation._Protocol.stage

    def recording_stage(self, name, contents, keep_replies=False):
        answers = stage(self, name, contents, keep_replies)
        if name == "collect masked vectors":
            for record in answers.values():
                masked_uploads.append([bytes_to_ndarray(b) for b in record["masked_params"]])
        return answers

    monkeypatch.setattr(secure_aggregation._Protocol, "stage", recording_stage)
    secure = RecordingStrategy(config)
    result = simulate(
        config.replace(
            **{"output_dir": str(tmp_path / "secure"), "privacy.secure-aggregation": True}
        ),
        strategy=secure,
        client_app=dropping_app,
        progress=False,
    )
    row = result.rows[1]
    assert row["clients-replied"] == 3
    assert list(row["clients-failed"]) == ["client-3"]
    assert "collect masked vectors stage" in row["clients-failed"]["client-3"]
    assert "site 3 lost power" in row["clients-failed"]["client-3"]

    # The server saw three masked uploads, none of them readable: a quantized plain
    # upload lies in [0, 2**22], a masked one is spread over [0, 2**32).
    assert len(masked_uploads) == 3
    for upload in masked_uploads:
        values = np.concatenate([a.ravel() for a in upload[1:]]).astype(np.float64)
        assert np.mean(values <= 2**22) < 0.01

    # What it aggregated is FedAvg of the three survivors, to the quantization step.
    ((mean, weight),) = secure.received
    dropped = len(load_client_data(config.data, config.seed, 4, 3).train)
    assert [w for _, w in plain.received].count(dropped) == 1
    kept = [(d, w) for d, w in plain.received if w != dropped]
    total = sum(w for _, w in kept)
    assert weight == pytest.approx(total, rel=1e-4)
    for name, value in mean.items():
        expected = sum(w * d[name] for d, w in kept) / total
        assert torch.allclose(value, expected, atol=2e-5), name


@pytest.mark.slow
def test_dp_sgd_through_flower_reports_epsilon_and_goes_on_without_a_spent_site(tiny_config):
    """Sites with fewer examples sample at a higher rate and spend faster. The budget is
    set so that every site affords round 1 and only the fastest spender would overrun
    in round 2: it refuses (and says why), the others train, and every round's metrics
    carry epsilon."""
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    sites, steps, noise = 3, 3, 1.0
    config = tiny_config.replace(
        **{
            "num-server-rounds": 3,
            "min-train-nodes": sites,
            "min-available-nodes": sites,
            "local-steps": steps,
            "fraction-evaluate": 0.0,
            "simulation.num-supernodes": sites,
            "simulation.client-cpus": 1.0,
            "privacy.dp-sgd": True,
            "privacy.noise-multiplier": noise,
            "privacy.seeded-noise": True,
        }
    )

    def spent(partition: int, rounds: int) -> float:
        n = len(load_client_data(config.data, config.seed, sites, partition).train)
        batches = math.ceil(n / 8)  # Opacus: 1 / len(a Poisson loader over n examples)
        rate = 1 / len(UniformWithReplacementSampler(num_samples=n, sample_rate=1 / batches))
        return _rdp_epsilon(noise, rate, rounds * steps)

    after_two = sorted(((spent(p, 2), p) for p in range(sites)), reverse=True)
    (top, fastest), (second, _) = after_two[0], after_two[1]
    # Every site affords round 1; in round 2 only the fastest spender would overrun.
    lower = max(second, *(spent(p, 1) for p in range(sites)))
    assert lower < top
    budget = (lower + top) / 2
    result = simulate(config.replace(**{"privacy.target-epsilon": budget}), progress=False)
    first, second_round = result.rows[1], result.rows[2]
    assert first["clients-replied"] == sites
    assert first["dp-epsilon-by-site"] == pytest.approx(
        {f"client-{p}": spent(p, 1) for p in range(sites)}
    )
    assert first["dp-epsilon"] == pytest.approx(max(spent(p, 1) for p in range(sites)))
    assert second_round["clients-replied"] == sites - 1
    why = second_round["clients-failed"][f"client-{fastest}"]
    assert why.startswith("refused: privacy budget spent")
    assert second_round["dp-epsilon-by-site"][f"client-{fastest}"] == pytest.approx(
        spent(fastest, 1)
    )
    assert result.summary["dp-epsilon"] <= budget
    # Round 3 would need all three sites (min-train-nodes): the run ends after round 2
    # and still exports its model.
    assert len(result.rows) == 3
    assert "training stopped after round 2" in result.summary["stopped-early"]
    assert result.adapter_dir.is_dir()
    # The checkpoint keeps each site's mechanisms: a resumed run charges them again.
    ledger = load_checkpoint(result.run_dir).privacy
    for site, spent_so_far in second_round["dp-epsilon-by-site"].items():
        assert PrivacyAccountant.from_meta(ledger[site]).epsilon(DELTA) == pytest.approx(
            spent_so_far
        )


# -- client-level DP through the round loop -------------------------------------------------
ROUND = {
    "num-server-rounds": 1,
    "local-steps": 2,
    "batch-size": 2,
    "model.max-length": 16,
    "fraction-evaluate": 0.0,
    "central-evaluation": False,
    "simulation.num-supernodes": 3,
    "min-train-nodes": 3,
    "min-available-nodes": 3,
}
"""One round of tiny training over 3 sites, all sampled, nothing evaluated."""


def _round_through_the_loop(
    config: RunConfig, run_dir: Path, app: ClientApp = client_app.app
) -> tuple[RecordingStrategy, dict[str, Any]]:
    """Run ``config`` through the server's round loop, its sites answering with ``app``
    in this process (an in-process Grid: Flower's serialization, no Ray)."""
    strategy = RecordingStrategy(config)
    transport = Transport(config.simulation.num_supernodes, app)
    federation = Federation(transport, config, run_dir, strategy=strategy, progress=False)
    federation.run()
    return strategy, federation.metrics.rows()[1]


@pytest.mark.training
@pytest.mark.filterwarnings("ignore:Optimal order is the")
def test_central_client_dp_in_the_round_loop_is_the_clipped_site_mean_plus_noise(
    tiny_config, tmp_path, in_process_messages
):
    """Three sites sampled, the third loses power: the server clips the two updates it
    gets, weighs them equally whatever their example counts, divides by the three
    sampled and adds noise of std z C / 3."""
    clip = 0.05
    central = {"privacy.client-dp": "central", "privacy.client-clip-norm": clip}
    sizes = {len(load_client_data(tiny_config.data, tiny_config.seed, 3, p).train) for p in (0, 1)}
    assert len(sizes) == 2, "equal example counts could not tell the weighting apart"
    losing_2 = _losing_power(2)
    for z in (1e-12, 1.0):  # the config needs z > 0; 1e-12 is noise off to float precision
        config = tiny_config.replace(**ROUND, **central, **{"privacy.client-noise-multiplier": z})
        strategy, row = _round_through_the_loop(config, tmp_path / f"z{z}", losing_2)
        assert row["clients-replied"] == 2 and list(row["clients-failed"]) == ["client-2"]
        updates = [delta for delta, _ in strategy.received]
        assert len(updates) == 2
        assert all(_norm(u) > clip for u in updates) and row["clients-clipped"] == 2
        assert row["client-dp-noise-multiplier"] == z
        (combined,) = strategy.combined
        expected = _clipped_mean(updates, clip, 3)
        if z < 1:
            _assert_exact(combined, expected, atol=1e-9)
        else:
            _assert_gaussian_noise(combined, expected, z * clip / 3)


@pytest.mark.training
@pytest.mark.filterwarnings("ignore:Optimal order is the")
def test_secure_aggregation_example_with_distributed_dp_is_the_clipped_site_mean_plus_noise(
    tiny_config, tmp_path, in_process_messages, monkeypatch
):
    """``examples/secure-aggregation.toml`` shrunk to one round over 3 sites: each site
    clips its delta and adds its noise share, SecAgg+ hands the server only the sum, and
    the aggregate is the clipped, equally weighted mean over the sampled sites plus noise
    of std z C / m (the shares sum to the central mechanism's). Noise off, the third site
    loses power mid-protocol: its masks are removed and the mean is still over 3."""
    import fedelta.client.trainer as trainer_module

    clean: list[dict[str, torch.Tensor]] = []
    share = trainer_module.add_noise_share

    def recording_share(delta, clip_norm, noise_multiplier, sampled, generator):
        """A site's delta before it is clipped and noised: known only to the site."""
        clean.append({k: v.clone() for k, v in delta.items()})
        assert sampled == 3
        return share(delta, clip_norm, noise_multiplier, sampled, generator)

    monkeypatch.setattr(trainer_module, "add_noise_share", recording_share)
    example = load_config(Path(__file__).parent.parent / "examples" / "secure-aggregation.toml")
    tiny = {k: tiny_config.to_flat()[k] for k in ("data.test-size", "data.validation-fraction")}
    config = example.replace(**ROUND, **tiny)
    p = config.privacy
    assert p.secure_aggregation and p.client_dp == "distributed" and config.strategy.lora == "ffa"
    # Each entry of each upload is quantized to within one step of 2 R / levels.
    step = 2 * p.secagg_clipping_range / p.secagg_quantization_range

    quiet = config.replace(**{"privacy.client-noise-multiplier": 1e-12})
    strategy, row = _round_through_the_loop(quiet, tmp_path / "quiet", _losing_power(2))
    assert row["clients-replied"] == 2 and list(row["clients-failed"]) == ["client-2"]
    ((_, weight),) = strategy.received  # one secure sum, never a site's upload
    assert weight == pytest.approx(2, rel=1e-4)
    assert len(clean) == 2 and all(_norm(d) > p.client_clip_norm for d in clean)
    (combined,) = strategy.combined
    _assert_exact(combined, _clipped_mean(clean, p.client_clip_norm, 3), atol=step, rtol=0)

    clean.clear()
    strategy, row = _round_through_the_loop(config, tmp_path / "noised")
    assert row["clients-replied"] == 3 and len(clean) == 3
    # The example's epsilon budget sets z: one round at sample rate 1 spends it.
    z = row["client-dp-noise-multiplier"]
    spent = _rdp_epsilon(z, 1.0, 1)
    assert p.client_target_epsilon - 0.02 <= spent <= p.client_target_epsilon
    assert row["client-dp-epsilon"] == pytest.approx(spent)
    (combined,) = strategy.combined
    signal = _clipped_mean(clean, p.client_clip_norm, 3)
    _assert_gaussian_noise(combined, signal, z * p.client_clip_norm / 3)


# -- accounting state ----------------------------------------------------------------------
def test_accounting_saved_in_the_node_state_gives_the_same_epsilon_and_keeps_composing():
    """A site's budget outlives the round: what it spent comes back from ``Context.state``
    and further rounds add to it instead of starting over."""
    state = RecordDict()
    assert PrivacyAccountant.load(state).history == []  # before its first private round
    assert PrivacyAccountant.load(state).epsilon(DELTA) == 0.0
    spent = PrivacyAccountant()
    spent.spend(1.1, 0.01, 40)
    spent.spend(0.8, 0.02, 10)
    spent.save(state)
    loaded = PrivacyAccountant.load(state)
    assert loaded.history == [(1.1, 0.01, 40), (0.8, 0.02, 10)]
    assert loaded.epsilon(DELTA) == pytest.approx(_composed_epsilon(loaded.history))
    loaded.spend(0.8, 0.02, 5)
    loaded.save(state)
    again = PrivacyAccountant.load(state)
    assert again.history == [(1.1, 0.01, 40), (0.8, 0.02, 15)]
    assert again.epsilon(DELTA) == pytest.approx(
        _composed_epsilon([(1.1, 0.01, 40), (0.8, 0.02, 15)])
    )


def test_projected_epsilon_is_what_the_next_steps_would_spend_and_spends_nothing():
    """The budget check before training: Opacus' epsilon of the history plus the planned
    steps, with the accountant left as it was."""
    accountant = PrivacyAccountant([(1.1, 0.01, 50)])
    projected = accountant.epsilon_after(0.8, 0.02, 30, DELTA)
    assert projected == pytest.approx(_composed_epsilon([(1.1, 0.01, 50), (0.8, 0.02, 30)]))
    assert accountant.history == [(1.1, 0.01, 50)]
    assert accountant.epsilon(DELTA) == pytest.approx(_rdp_epsilon(1.1, 0.01, 50))
    assert accountant.epsilon_after(1.1, 0.01, 50, DELTA) == pytest.approx(
        _rdp_epsilon(1.1, 0.01, 100)
    )
    assert PrivacyAccountant().epsilon_after(1.1, 0.01, 0, DELTA) == 0.0


@pytest.mark.parametrize("meta", [None, {}, {"noise-multiplier": 2.0}])
def test_a_checkpoint_without_a_ledger_is_an_empty_accountant(meta):
    """Older or non-private checkpoints carry no history: nothing has been spent."""
    accountant = PrivacyAccountant.from_meta(meta)
    assert accountant.history == []
    assert accountant.epsilon(DELTA) == 0.0


def test_a_reported_ledger_with_columns_of_different_lengths_is_refused():
    """A truncated record must not silently drop mechanisms: that would under-report what
    the site has spent."""
    record = PrivacyAccountant([(1.1, 0.01, 50), (0.8, 0.02, 10)]).to_record()
    record["steps"] = [50]
    with pytest.raises(ValueError):
        PrivacyAccountant.from_record(record)


@pytest.mark.filterwarnings("ignore:Optimal order is the")
def test_a_resumed_client_dp_keeps_the_noise_multiplier_of_the_first_round():
    """z derived from the target epsilon is fixed at the first round's sample rate; a
    resume must not re-derive it from a later round's rate."""
    settings = _settings(client_noise_multiplier=0.0, client_target_epsilon=4.0)
    dp = ClientLevelDP(settings, rounds=5, seed=0)
    dp.sampling(2, 8)
    dp.begin(1)
    dp.add({"w": torch.ones(4)}, 1.0)
    dp.result()
    z = dp.noise_multiplier
    assert z == pytest.approx(
        get_noise_multiplier(
            target_epsilon=4.0, target_delta=settings.delta, sample_rate=0.25, steps=5
        )
    )
    resumed = ClientLevelDP(settings, rounds=5, seed=0)
    resumed.load_state_dict(json.loads(json.dumps(dp.state_dict())))
    assert resumed.noise_multiplier == z
    resumed.sampling(6, 8)  # more sites this round: a re-derived z would differ
    resumed.begin(2)
    resumed.add({"w": torch.ones(4)}, 1.0)
    resumed.result()
    assert resumed.noise_multiplier == z
    assert resumed.metrics()["client-dp-noise-multiplier"] == z
    assert resumed.metrics()["client-dp-epsilon"] == pytest.approx(
        _composed_epsilon([(z, 0.25, 1), (z, 0.75, 1)])
    )


@pytest.mark.filterwarnings("ignore:Optimal order is the")
def test_client_dp_state_without_a_noise_multiplier_derives_it_at_the_next_sampling():
    """An aggregator state saved before any round knows no z yet: the first sampling after
    loading it derives z, as a fresh run would."""
    settings = _settings(client_noise_multiplier=0.0, client_target_epsilon=4.0)
    dp = ClientLevelDP(settings, rounds=5, seed=0)
    dp.load_state_dict(ClientLevelDP(settings, rounds=5, seed=0).state_dict())
    assert dp.noise_multiplier == 0.0 and dp.accountant.history == []
    dp.load_state_dict({})
    assert dp.noise_multiplier == 0.0 and dp.accountant.history == []
    dp.sampling(2, 8)
    assert dp.noise_multiplier == pytest.approx(
        get_noise_multiplier(
            target_epsilon=4.0, target_delta=settings.delta, sample_rate=0.25, steps=5
        )
    )


def test_the_aggregator_weighs_replies_and_tells_securely_aggregated_sites_its_weight():
    """The weighting rule is the aggregator's: the mean weighs a reply by its examples,
    client-level DP weighs every site 1. A strategy that can be securely aggregated
    also tells the sites, which weigh their masked uploads themselves."""
    from fedelta.strategies.aggregators.base import SITE_WEIGHT

    base = RunConfig()
    plain = build_strategy(base)
    assert plain.reply_weight(37) == 37.0 and SITE_WEIGHT not in plain.client_config(1)
    dp = {"privacy.client-noise-multiplier": 1.0, "strategy.lora": "ffa"}
    distributed = build_strategy(base.replace(**dp, **{"privacy.client-dp": "distributed"}))
    assert distributed.reply_weight(37) == 1.0
    assert distributed.client_config(1)[SITE_WEIGHT] == 1
    central = build_strategy(base.replace(**dp, **{"privacy.client-dp": "central"}))
    assert central.reply_weight(37) == 1.0  # clipped in the clear: never masked
    assert SITE_WEIGHT not in central.client_config(1)


def test_distributed_client_dp_sums_the_noised_shares_over_the_sampled_sites():
    """The server neither clips nor adds noise (the sites did, and it may only see the
    sum); it divides by the sampled sites, and tells the sites m and z."""
    dp = ClientLevelDP(_settings(client_dp="distributed"), rounds=3, seed=0)
    assert dp.linear and not dp.central
    dp.sampling(4, 10)
    assert dp.client_config() == {"client-dp-sampled": 4, "client-dp-noise-multiplier": 2.0}
    dp.begin(1)
    big, small = {"w": torch.full((3,), 10.0)}, {"w": torch.tensor([1.0, 2.0, 3.0])}
    dp.add(big, 1.0)
    dp.add(small, 2.0)  # a securely aggregated mean standing for 2 sites
    _assert_exact(dp.result(), {"w": (big["w"].double() + 2 * small["w"].double()) / 4}, 1e-6)
    assert "clients-clipped" not in dp.metrics()
    assert dp.metrics()["client-dp-epsilon"] == pytest.approx(_rdp_epsilon(2.0, 0.4, 1))


@pytest.mark.filterwarnings("ignore:Optimal order is the")
def test_central_client_dp_noise_scales_with_the_clip_norm_over_the_sampled_sites():
    """std z C / m for a clip norm other than 1 (C and m enter differently)."""
    dp = ClientLevelDP(
        _settings(client_clip_norm=0.5, client_noise_multiplier=1.0), rounds=1, seed=0
    )
    assert dp.central and not dp.linear and dp.client_config() == {}
    dp.sampling(2, 10)
    dp.begin(1)
    dp.add({"w": torch.zeros(100_000)}, 1.0)
    _assert_gaussian_noise(dp.result(), {"w": torch.zeros(100_000, dtype=torch.float64)}, 0.25)


def test_seeded_central_noise_is_fresh_for_every_round_and_run_seed():
    """Repeated noise could be cancelled by differencing two rounds' models."""

    def noise(seed: int, server_round: int) -> torch.Tensor:
        dp = ClientLevelDP(_settings(), rounds=3, seed=seed)
        dp.sampling(1, 1)
        dp.begin(server_round)
        dp.add({"w": torch.zeros(1000)}, 1.0)
        return dp.result()["w"]

    assert torch.equal(noise(0, 1), noise(0, 1))
    assert not torch.equal(noise(0, 1), noise(0, 2))
    assert not torch.equal(noise(0, 1), noise(1, 1))


def test_a_configured_client_noise_multiplier_is_used_as_is():
    dp = ClientLevelDP(_settings(client_noise_multiplier=0.7), rounds=3, seed=0)
    dp.sampling(2, 10)
    assert dp.noise_multiplier == 0.7
    assert dp.metrics()["client-dp-noise-multiplier"] == 0.7


def test_client_dp_refuses_to_aggregate_without_sampling_or_updates():
    dp = ClientLevelDP(_settings(), rounds=3, seed=0)
    dp.begin(1)
    with pytest.raises(
        RuntimeError, match=r"^client-level DP needs the round's sampling \(sampling\(\)\)$"
    ):
        dp.result()
    dp.sampling(2, 10)
    dp.begin(1)
    with pytest.raises(EmptyRoundError, match="^no client update was accumulated this round$"):
        dp.result()
    assert dp.accountant.history == []  # nothing released, nothing spent
    with pytest.raises(ValueError, match="^client-dp must be central or distributed, got none$"):
        ClientLevelDP(_settings(client_dp="none"), rounds=3, seed=0)


def test_steps_not_taken_spend_nothing():
    """A site that ran no step this round reports no epsilon and leaves its ledger as is."""
    accountant = PrivacyAccountant()
    accountant.spend(1.1, 0.01, 0)
    assert accountant.history == [] and accountant.epsilon(DELTA) == 0.0
    accountant.spend(1.1, 0.01, 10)
    accountant.spend(0.8, 0.02, 0)
    assert accountant.history == [(1.1, 0.01, 10)]
