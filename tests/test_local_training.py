"""The local-training recipe: lr schedules, warmup, clipping, the head's lr, the
epoch cap, kept optimizer state, calibrated losses and the pooling of the head."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from fedelta.client.calibration import LogitCalibration
from fedelta.compatibility import check_config
from fedelta.config import ConfigError, RunConfig
from fedelta.tasks.pooling import (
    MeanPooling,
    PoolingError,
    apply_pooling,
    checkpoint_pooling,
    pooling_of,
)
from fedelta.training import (
    local_optimizer,
    optimizer_state,
    restore_optimizer_state,
    round_lr,
    steps_for,
    train,
)


def test_round_lr_decays_from_lr_towards_min_lr_over_the_rounds():
    assert [round_lr(1.0, "constant", 0.0, r, 4) for r in (1, 4)] == [1.0, 1.0]
    assert [round_lr(1.0, "linear", 0.2, r, 4) for r in (1, 2, 3, 4)] == pytest.approx(
        [1.0, 0.8, 0.6, 0.4]
    )
    cosine = [round_lr(1.0, "cosine", 0.0, r, 4) for r in (1, 2, 3, 4)]
    assert cosine == pytest.approx([0.5 * (1 + math.cos(math.pi * i / 4)) for i in range(4)])
    assert cosine[-1] > 0  # the last round still trains


def test_the_epoch_cap_bounds_a_small_site_and_leaves_a_large_one():
    assert steps_for(41, 16, 1, 25) == 25
    assert steps_for(41, 16, 1, 25, max_local_epochs=2.0) == 6  # 2 x ceil(41 / 16)
    assert steps_for(3709, 16, 1, 25, max_local_epochs=2.0) == 25
    assert steps_for(5, 16, 1, 25, max_local_epochs=0.1) == 1  # never zero steps


class _Linear(torch.nn.Module):
    """y = w . x with a squared loss, and a 'classifier' the head lr applies to."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(3, 1, bias=False)
        self.classifier = torch.nn.Linear(1, 1, bias=False)
        for p in self.parameters():
            torch.nn.init.zeros_(p)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> _Out:
        return _Out(((self.classifier(self.body(x)) + self.body(x) - y) ** 2).mean())


class _Out:
    def __init__(self, loss: torch.Tensor) -> None:
        self.loss = loss


def _batches(n: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        {"x": torch.randn(4, 3, generator=generator), "y": torch.randn(4, 1, generator=generator)}
        for _ in range(n)
    ]


def _named(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return dict(model.named_parameters())


def test_the_head_gets_its_own_learning_rate():
    model = _Linear()
    optimizer = local_optimizer(_named(model), optim="sgd", lr=0.1, head_lr=0.5)
    rates = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert rates[id(model.body.weight)] == 0.1 and rates[id(model.classifier.weight)] == 0.5
    single = local_optimizer(_named(model), optim="adamw", lr=0.1)
    assert len(single.param_groups) == 1 and isinstance(single, torch.optim.AdamW)


def test_warmup_ramps_each_step_and_restores_the_rate():
    """Plain SGD moves by lr x factor x gradient: the first of 4 warmup steps by 1/4."""
    batch = _batches(1)[0]
    model = _Linear()
    optimizer = local_optimizer(_named(model), optim="sgd", lr=0.1, momentum=0.0)
    train(model, [batch], lr=0.1, optimizer=optimizer, warmup_steps=4)
    warmed = model.body.weight.detach().clone()
    reference = _Linear()
    plain = local_optimizer(_named(reference), optim="sgd", lr=0.1 / 4, momentum=0.0)
    train(reference, [batch], lr=0.1 / 4, optimizer=plain)
    torch.testing.assert_close(warmed, reference.body.weight.detach())
    assert optimizer.param_groups[0]["lr"] == 0.1


def test_gradient_clipping_bounds_the_step():
    model = _Linear()
    batch = {"x": torch.full((2, 3), 100.0), "y": torch.full((2, 1), -100.0)}
    optimizer = local_optimizer(_named(model), optim="sgd", lr=1.0, momentum=0.0)
    train(model, [batch], lr=1.0, optimizer=optimizer, max_grad_norm=0.5)
    moved = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert moved.norm().item() == pytest.approx(0.5, rel=1e-5)


@pytest.mark.parametrize("optim", ["adamw", "sgd"])
def test_kept_optimizer_state_makes_two_rounds_one_run(optim):
    """Two calls of 3 steps with the state carried equal one call of 6 steps, bit for bit."""
    batches = _batches(6)
    straight = _Linear()
    opt = local_optimizer(_named(straight), optim=optim, lr=0.05, momentum=0.9)
    train(straight, batches, lr=0.05, optimizer=opt)
    split = _Linear()
    first = local_optimizer(_named(split), optim=optim, lr=0.05, momentum=0.9)
    train(split, batches[:3], lr=0.05, optimizer=first)
    kept = optimizer_state(first, _named(split))
    assert kept and all(k.split("/")[0] in _named(split) for k in kept)
    second = local_optimizer(_named(split), optim=optim, lr=0.05, momentum=0.9)
    restore_optimizer_state(second, _named(split), kept)
    train(split, batches[3:], lr=0.05, optimizer=second)
    for a, b in zip(straight.parameters(), split.parameters(), strict=True):
        assert torch.equal(a, b)


class _Logits(torch.nn.Module):
    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, **inputs: torch.Tensor) -> object:
        assert "labels" not in inputs
        return type("Out", (), {"logits": self.logits})()


def test_logit_adjusted_loss_is_cross_entropy_on_logits_plus_tau_log_prior():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.3, -0.2]])
    labels = torch.tensor([0, 1])
    counts = [30, 10, 60]
    loss = LogitCalibration("logit-adjusted", 0.5, counts)(_Logits(logits), {"labels": labels})
    prior = torch.tensor(counts, dtype=torch.float32) / 100
    by_hand = (
        -sum(torch.log_softmax(logits[i] + 0.5 * prior.log(), dim=0)[labels[i]] for i in range(2))
        / 2
    )
    torch.testing.assert_close(loss, by_hand)


def test_fedlc_loss_subtracts_tau_times_count_to_the_minus_quarter():
    logits = torch.tensor([[1.0, 2.0]])
    loss = LogitCalibration("fedlc", 2.0, [16, 81])(_Logits(logits), {"labels": torch.tensor([0])})
    calibrated = logits - 2.0 * torch.tensor([16**-0.25, 81**-0.25])
    torch.testing.assert_close(loss, F.cross_entropy(calibrated, torch.tensor([0])))


def test_a_class_the_site_never_saw_leaves_its_softmax():
    calibration = LogitCalibration.for_labels("logit-adjusted", 1.0, [0, 0, 1], num_labels=3)
    assert calibration.offsets[2] == -math.inf
    logits = torch.tensor([[0.0, 0.0, 50.0]], requires_grad=True)
    loss = calibration(_Logits(logits), {"labels": torch.tensor([0])})
    loss.backward()
    assert math.isfinite(loss.item()) and logits.grad[0, 2] == 0


def test_minilm_pools_by_the_mean_its_checkpoint_was_trained_with():
    from fedelta.assets import MODELS
    from fedelta.models import load_base_model, load_tokenizer

    assert checkpoint_pooling(str(MODELS["all-MiniLM-L6-v2"].path())) == "mean"
    model = load_base_model("all-MiniLM-L6-v2", 2, pooling="auto")
    assert pooling_of(model) == "mean" and isinstance(model.bert.pooler, MeanPooling)
    tokens = load_tokenizer("all-MiniLM-L6-v2")(
        ["a long and moving film about nothing", "dull"], padding=True, return_tensors="pt"
    )
    model.eval()
    with torch.no_grad():
        out = model.bert(**tokens)
    mask = tokens["attention_mask"].unsqueeze(-1).float()
    by_hand = (out.last_hidden_state * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(out.pooler_output, by_hand)
    assert pooling_of(load_base_model("all-MiniLM-L6-v2", 2, pooling="cls")) == "cls"


def test_a_model_fedelta_wrote_pools_as_it_records(tmp_path):
    assert checkpoint_pooling(str(tmp_path)) == "cls"
    (tmp_path / "fedelta.json").write_text(json.dumps({"pooling": "mean"}))
    assert checkpoint_pooling(str(tmp_path)) == "mean"


def test_mean_pooling_needs_a_pooler_to_replace():
    with pytest.raises(PoolingError, match="model 'tiny' has none"):
        apply_pooling(torch.nn.Linear(2, 2), "mean", "tiny")


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (
            {
                "model.task": "causal-lm",
                "data.name": "chat",
                "data.partitioner": "iid",
                "loss": "logit-adjusted",
            },
            "'loss'",
        ),
        (
            {
                "model.task": "causal-lm",
                "data.name": "chat",
                "data.partitioner": "iid",
                "model.pooling": "mean",
            },
            "'model.pooling'",
        ),
        (
            {"privacy.dp-sgd": True, "privacy.noise-multiplier": 1.0, "max-grad-norm": 1.0},
            "'max-grad-norm'",
        ),
        (
            {"privacy.dp-sgd": True, "privacy.noise-multiplier": 1.0, "warmup-steps": 3},
            "'warmup-steps'",
        ),
        (
            {"privacy.dp-sgd": True, "privacy.noise-multiplier": 1.0, "loss": "fedlc"},
            "'loss'.*label counts",
        ),
    ],
)
def test_recipe_options_a_setup_cannot_use_are_refused_by_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        check_config(RunConfig().replace(**overrides))


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"lr-scheduler": "cosine", "min-lr": 0.1}, "'min-lr'"),
        ({"optim": "adam"}, "'optim'"),
        ({"loss": "focal"}, "'loss'"),
        ({"model.pooling": "max"}, "'model.pooling'"),
        ({"max-local-epochs": -1.0}, "'max-local-epochs'"),
    ],
)
def test_bad_recipe_values_stop_before_training(overrides, key):
    with pytest.raises(ConfigError, match=key):
        RunConfig().replace(**overrides)
