"""The local training loop shared by clients and the centralised baseline.

The loop is plain PyTorch over the model's trainable parameters so that a
federated client costs the same as a bare peft + torch loop on the same data.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class TrainResult:
    loss: float
    """Mean training loss over the steps taken."""
    steps: int


class StepHook(Protocol):
    """Called around each optimizer step (sparse training masks implement it)."""

    def before_step(self, params: Mapping[str, torch.nn.Parameter]) -> None:
        """After backward, before the optimizer step."""

    def after_step(self, params: Mapping[str, torch.nn.Parameter]) -> None:
        """After the optimizer step."""


class StepHooks:
    """Several :class:`StepHook` as one, called in order around each step (a gradient
    correction before a sparse-training mask, so masked coordinates stay frozen)."""

    def __init__(self, *hooks: StepHook | None) -> None:
        self.hooks = [h for h in hooks if h is not None]

    def before_step(self, params: Mapping[str, torch.nn.Parameter]) -> None:
        for hook in self.hooks:
            hook.before_step(params)

    def after_step(self, params: Mapping[str, torch.nn.Parameter]) -> None:
        for hook in self.hooks:
            hook.after_step(params)


def train(
    model: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    lr: float,
    weight_decay: float = 0.0,
    optimizer: torch.optim.Optimizer | None = None,
    proximal_mu: float = 0.0,
    anchor: Mapping[str, torch.Tensor] | None = None,
    hook: StepHook | None = None,
    accumulation: int = 1,
    plain_sgd: bool = False,
) -> TrainResult:
    """One AdamW step per ``accumulation`` batches on the trainable parameters.

    Federated clients start each round with a fresh optimizer (``optimizer=None``);
    a centralised run passes its own to keep the moments across calls. With
    ``proximal_mu > 0`` (FedProx) the loss gains ``mu/2 * ||w - anchor||^2`` over
    the trainable parameters named in ``anchor``; the reported loss excludes it.
    ``hook`` sees the parameters around every step (a sparse-training mask).
    With ``accumulation > 1`` each step sums the gradients of that many batches
    (each loss divided by ``accumulation``); a last incomplete group is a step too.
    ``plain_sgd`` takes plain SGD steps (no momentum) instead of AdamW's, as SCAFFOLD's
    option II and FedNova's normalisation assume.
    """
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if optimizer is None:
        params = list(named.values())
        optimizer = (
            torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
            if plain_sgd
            else torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        )
    pulled = (
        [(p, anchor[n].to(p.dtype)) for n, p in named.items() if n in anchor]
        if proximal_mu and anchor
        else []
    )
    model.train()
    total_loss, batches_seen, steps = 0.0, 0, 0
    pending = 0
    optimizer.zero_grad(set_to_none=True)
    for batch in batches:
        loss = model(**batch).loss
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"training loss became {value} at step {steps}")
        if pulled:
            loss = loss + proximal_mu / 2 * sum((p - a).pow(2).sum() for p, a in pulled)
        (loss / accumulation).backward()
        total_loss += value
        batches_seen += 1
        pending += 1
        if pending == accumulation:
            _step(optimizer, named, hook)
            steps, pending = steps + 1, 0
    if pending:
        _step(optimizer, named, hook)
        steps += 1
    if steps == 0:
        raise ValueError("no batch to train on")
    return TrainResult(loss=total_loss / batches_seen, steps=steps)


def _step(
    optimizer: torch.optim.Optimizer,
    named: Mapping[str, torch.nn.Parameter],
    hook: StepHook | None,
) -> None:
    if hook is not None:
        hook.before_step(named)
    optimizer.step()
    if hook is not None:
        hook.after_step(named)
    optimizer.zero_grad(set_to_none=True)


def steps_for(num_examples: int, batch_size: int, local_epochs: int, local_steps: int) -> int:
    """Steps per round: ``local_steps`` when set, else whole epochs over the data."""
    if local_steps > 0:
        return local_steps
    return local_epochs * max(1, math.ceil(num_examples / batch_size))
