"""The local training loop shared by clients and the centralised baseline.

The loop is plain PyTorch over the model's trainable parameters so that a
federated client costs the same as a bare peft + torch loop on the same data.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

from fedelta.tensors import TensorDict, is_head


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


LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]
"""A batch's training loss from the model (a calibrated loss, say); default: the
model's own loss."""


def round_lr(base: float, scheduler: str, min_lr: float, server_round: int, rounds: int) -> float:
    """The client lr of ``server_round`` (1-based) of ``rounds``: ``constant``, or a
    ``linear`` / ``cosine`` decay from ``base`` in round 1 towards ``min_lr``, which it
    would reach one round after the last (so the last round still trains)."""
    if scheduler == "constant" or rounds <= 0:
        return base
    progress = min(max(server_round - 1, 0) / rounds, 1.0)
    if scheduler == "linear":
        shape = 1.0 - progress
    elif scheduler == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown lr-scheduler {scheduler!r}")
    return min_lr + (base - min_lr) * shape


def local_optimizer(
    named: Mapping[str, torch.nn.Parameter],
    *,
    optim: str,
    lr: float,
    head_lr: float = 0.0,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
) -> torch.optim.Optimizer:
    """The client optimizer over ``named`` parameters; the head's (:func:`is_head`)
    learn at ``head_lr`` when it is set."""
    body = [p for n, p in named.items() if not (head_lr and is_head(n))]
    head = [p for n, p in named.items() if head_lr and is_head(n)]
    groups = [{"params": body, "lr": lr}] + ([{"params": head, "lr": head_lr}] if head else [])
    groups = [g for g in groups if g["params"]]
    if optim == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    if optim == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optim {optim!r}")


def optimizer_state(
    optimizer: torch.optim.Optimizer, named: Mapping[str, torch.nn.Parameter]
) -> TensorDict:
    """The optimizer's per-parameter state (moments, step counts) keyed
    ``<parameter>/<entry>``, as fp32 copies a site can keep between rounds."""
    names = {id(p): n for n, p in named.items()}
    state: TensorDict = {}
    for param, entries in optimizer.state.items():
        for key, value in entries.items():
            tensor = torch.as_tensor(value, dtype=torch.float32)
            state[f"{names[id(param)]}/{key}"] = tensor.detach().clone()
    return state


def restore_optimizer_state(
    optimizer: torch.optim.Optimizer,
    named: Mapping[str, torch.nn.Parameter],
    state: Mapping[str, torch.Tensor],
) -> None:
    """Put back what :func:`optimizer_state` kept, for the parameters still trained
    (a parameter frozen this round keeps its entry for later; a new one starts afresh)."""
    for name, param in named.items():
        entries = {
            key.removeprefix(f"{name}/"): value
            for key, value in state.items()
            if key.rsplit("/", 1)[0] == name
        }
        if entries:
            optimizer.state[param] = {key: value.clone() for key, value in entries.items()}


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
    warmup_steps: int = 0,
    max_grad_norm: float = 0.0,
    loss_fn: LossFn | None = None,
) -> TrainResult:
    """One optimizer step per ``accumulation`` batches on the trainable parameters.

    ``optimizer`` defaults to a fresh AdamW at ``lr`` (what a client without kept
    state starts each round with); a centralised run passes its own to keep the
    moments across calls. With ``proximal_mu > 0`` (FedProx) the loss gains
    ``mu/2 * ||w - anchor||^2`` over the trainable parameters named in ``anchor``;
    the reported loss excludes it. ``hook`` sees the parameters around every step
    (a sparse-training mask). With ``accumulation > 1`` each step sums the
    gradients of that many batches (each loss divided by ``accumulation``); a last
    incomplete group is a step too. The first ``warmup_steps`` steps ramp every
    group's lr linearly up to its own; ``max_grad_norm > 0`` clips each step's
    gradient to that global norm; ``loss_fn`` replaces the model's own loss.
    """
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if optimizer is None:
        optimizer = torch.optim.AdamW(list(named.values()), lr=lr, weight_decay=weight_decay)
    peak = [group["lr"] for group in optimizer.param_groups]
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
        loss = loss_fn(model, batch) if loss_fn is not None else model(**batch).loss
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
            _step(optimizer, named, hook, _warmup(steps, warmup_steps), peak, max_grad_norm)
            steps, pending = steps + 1, 0
    if pending:
        _step(optimizer, named, hook, _warmup(steps, warmup_steps), peak, max_grad_norm)
        steps += 1
    for group, rate in zip(optimizer.param_groups, peak, strict=True):
        group["lr"] = rate
    if steps == 0:
        raise ValueError("no batch to train on")
    return TrainResult(loss=total_loss / batches_seen, steps=steps)


def _warmup(step: int, warmup_steps: int) -> float:
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def _step(
    optimizer: torch.optim.Optimizer,
    named: Mapping[str, torch.nn.Parameter],
    hook: StepHook | None,
    factor: float = 1.0,
    peak: list[float] | None = None,
    max_grad_norm: float = 0.0,
) -> None:
    if hook is not None:
        hook.before_step(named)
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(list(named.values()), max_grad_norm)
    for group, rate in zip(optimizer.param_groups, peak or [], strict=False):
        group["lr"] = rate * factor
    optimizer.step()
    if hook is not None:
        hook.after_step(named)
    optimizer.zero_grad(set_to_none=True)


def steps_for(
    num_examples: int,
    batch_size: int,
    local_epochs: int,
    local_steps: int,
    max_local_epochs: float = 0.0,
) -> int:
    """Steps per round: ``local_steps`` when set, else whole epochs over the data;
    at most ``max_local_epochs`` passes over the data when that is set (at least one
    step)."""
    per_epoch = max(1, math.ceil(num_examples / batch_size))
    steps = local_steps if local_steps > 0 else local_epochs * per_epoch
    if max_local_epochs > 0:
        steps = min(steps, max(1, math.ceil(max_local_epochs * per_epoch)))
    return steps
