"""Sample-level DP-SGD on a site's PEFT model, with Opacus.

Each round a site trains its trainable tensors (LoRA factors, head; or the target
modules' weights under full fine-tuning) with Opacus' ``PrivacyEngine``: Poisson
sampling of batches (rate ``batch-size / examples``), per-example gradients
clipped to ``max-grad-norm``, Gaussian noise of ``noise-multiplier x
max-grad-norm`` on their sum. The site's accountant carries over from earlier
rounds, so the epsilon it reports is what all its rounds together spent.

Opacus can fail silently: a trainable parameter that gets no per-example
gradient (a hook that was never registered) is stepped without clipping or noise,
and one whose per-example gradient is broadcast over the batch (BERT's position
embeddings) is clipped as one example. Both are checked on the first batch and
stop training with the parameters' names.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from torch.utils.data import DataLoader

from fedelta.config import PrivacyConfig
from fedelta.data import cycle
from fedelta.privacy.accounting import PrivacyAccountant, PrivacyBudgetError, noise_for_epsilon
from fedelta.privacy.noise import noise_generator
from fedelta.protocol import BUDGET_SPENT
from fedelta.seeding import seed_everything
from fedelta.tasks import Task
from fedelta.training import LossFn, TrainResult


class DPTrainingError(RuntimeError):
    """Opacus could not compute a true per-example gradient for some parameter."""


@dataclass(frozen=True)
class PrivateRound:
    """What one round of DP-SGD spent."""

    result: TrainResult
    noise_multiplier: float
    sample_rate: float
    epsilon: float
    """Epsilon spent by this site over all its rounds so far (this one included)."""


def plan_noise(
    settings: PrivacyConfig, sample_rate: float, steps_per_round: int, rounds: int
) -> float:
    """The noise multiplier a site uses: the configured one, or the smallest that keeps
    a site trained in every round within ``target-epsilon``."""
    if settings.noise_multiplier > 0:
        return settings.noise_multiplier
    return noise_for_epsilon(
        settings.target_epsilon, settings.delta, sample_rate, steps_per_round * rounds
    )


def check_budget(
    accountant: PrivacyAccountant,
    settings: PrivacyConfig,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
) -> None:
    """Refuse a round that would take the site past ``target-epsilon``."""
    if settings.target_epsilon <= 0:
        return
    after = accountant.epsilon_after(noise_multiplier, sample_rate, steps, settings.delta)
    if after > settings.target_epsilon * (1 + 1e-9):
        spent = accountant.epsilon(settings.delta)
        raise PrivacyBudgetError(
            f"{BUDGET_SPENT}: epsilon {spent:.3f} of {settings.target_epsilon:g} used, "
            f"another round would reach {after:.3f}"
        )


def train_private(
    model: torch.nn.Module,
    task: Task,
    examples: Sequence[Any],
    collate_fn: Any,
    *,
    batch_size: int,
    steps: int,
    rounds: int,
    lr: float,
    weight_decay: float,
    settings: PrivacyConfig,
    accountant: PrivacyAccountant,
    seed_parts: tuple[int, ...],
    optimizer: torch.optim.Optimizer | None = None,
    loss_fn: LossFn | None = None,
) -> PrivateRound:
    """``steps`` DP-SGD steps (AdamW on the noised gradients) over ``examples``.

    ``accountant`` is the site's: checked against the budget before anything trains
    (raising :class:`PrivacyBudgetError`), and charged with this round's steps.
    ``model`` is left without Opacus hooks, ready for evaluation or plain training.
    ``optimizer`` (default: AdamW at ``lr``) steps the noised gradients; ``loss_fn``
    (default: the task's per-example mean loss) must stay a mean of per-example losses.
    """
    if not examples:
        raise ValueError("no example to train on")
    # Poisson sampling at rate 1 / (batches per epoch), exactly as Opacus accounts it.
    # Opacus reads the shape of each field of the first example: give it 1-tuples.
    wrapped = [(example,) for example in examples]
    poisson = DPDataLoader.from_data_loader(
        DataLoader(
            wrapped,
            batch_size=batch_size,
            collate_fn=lambda drawn: collate_fn([example for (example,) in drawn]),
        )
    )
    sample_rate = 1 / len(poisson)
    noise_multiplier = plan_noise(settings, sample_rate, steps, rounds)
    check_budget(accountant, settings, noise_multiplier, sample_rate, steps)
    if not settings.seeded_noise:
        # Poisson sampling draws from torch's global generator.
        seed_everything(secrets.randbits(63))
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer is None:
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    example_loss = loss_fn or task.example_mean_loss
    engine = PrivacyEngine(accountant="rdp")
    engine.accountant.history = list(accountant.history)
    model.train()
    private_model, dp_optimizer, dp_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=poisson,
        noise_multiplier=noise_multiplier,
        max_grad_norm=settings.max_grad_norm,
        poisson_sampling=False,  # the loader samples already
        noise_generator=noise_generator(settings.seeded_noise, *seed_parts),
    )
    total_loss, batches, checked = 0.0, 0, False
    try:
        dp_optimizer.zero_grad(set_to_none=True)
        for batch in cycle(dp_loader, steps):
            # An empty draw: a list before any example was drawn, else empty tensors.
            size = next(iter(batch.values())).shape[0] if isinstance(batch, Mapping) else 0
            if size == 0:
                # Poisson sampling drew nobody: still a noised (all-noise) step.
                for p in params:
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
            else:
                loss = example_loss(private_model, batch)
                value = loss.item()
                if not math.isfinite(value):
                    raise FloatingPointError(f"training loss became {value}")
                loss.backward()
                if not checked:
                    _check_per_example_gradients(model, size)
                    checked = True
                total_loss += value
                batches += 1
            dp_optimizer.step()
            dp_optimizer.zero_grad(set_to_none=True)
    finally:
        private_model.cleanup()  # hooks and per-example attributes off the shared model
        for p in params:
            p.grad = None
    accountant.history = list(engine.accountant.history)
    return PrivateRound(
        result=TrainResult(loss=total_loss / batches if batches else math.nan, steps=steps),
        noise_multiplier=noise_multiplier,
        sample_rate=sample_rate,
        epsilon=accountant.epsilon(settings.delta),
    )


def _check_per_example_gradients(model: torch.nn.Module, batch_size: int) -> None:
    """Every trainable parameter has a per-example gradient with one row per example."""
    missing, broadcast = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        sample = getattr(p, "grad_sample", None)
        if sample is None:
            missing.append(name)
        elif sample.shape[0] != batch_size:
            broadcast.append(name)
    if missing or broadcast:
        problems = []
        if missing:
            problems.append(f"no per-example gradient for {', '.join(missing[:5])}")
        if broadcast:
            problems.append(
                f"per-example gradients not per example (shared across the batch, as for "
                f"position embeddings) for {', '.join(broadcast[:5])}"
            )
        raise DPTrainingError(
            "DP-SGD cannot train this model as configured: "
            + "; ".join(problems)
            + ". Freeze those parameters or leave them out of lora.target-modules."
        )
