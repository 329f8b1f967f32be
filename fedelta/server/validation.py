"""Validation of a client's training reply, before it touches any accumulator.

A site the server does not control can send garbage (a bug, a bad disk) or an
attack. Every reply is checked here, in full, and either yields a usable
:class:`Update` or raises :class:`~fedelta.errors.InvalidUpdateError` with a
reason the round's metrics record under the site's name. Nothing is unpickled:
tensors are ``.npy`` bytes read with ``allow_pickle=False``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from flwr.app import RecordDict

from fedelta import protocol
from fedelta.compression import UplinkCompression
from fedelta.errors import InvalidUpdateError
from fedelta.tensors import Delta, global_norm


@dataclass(frozen=True)
class ReplyMetrics:
    """The numbers of a training reply, checked."""

    num_examples: int
    train_loss: float
    epsilon: float | None = None
    """DP-SGD epsilon the site has spent so far, when it trains with DP-SGD."""
    mechanism: tuple[float, float, int] | None = None
    """DP-SGD: this round's (noise multiplier, sample rate, steps)."""
    steps: int | None = None
    """Local optimizer steps the reply reports (``train-steps``), if any."""


@dataclass(frozen=True)
class Update:
    """A validated training reply."""

    delta: Delta
    """Dense and sparse tensors by name, decoded as ``[compression]`` says."""
    metrics: ReplyMetrics


def read_metrics(content: RecordDict) -> ReplyMetrics:
    """Example count, train loss and (under DP-SGD) epsilon of a training reply."""
    metrics = content.metric_records.get(protocol.METRICS)
    if metrics is None:
        raise InvalidUpdateError(f"reply has no '{protocol.METRICS}' record")
    num_examples = metrics.get(protocol.NUM_EXAMPLES)
    if type(num_examples) is not int or num_examples <= 0:  # bool is an int subclass
        raise InvalidUpdateError(
            f"{protocol.NUM_EXAMPLES} must be a positive integer, got {num_examples!r}"
        )
    loss = metrics.get(protocol.TRAIN_LOSS)
    if type(loss) not in (int, float) or not math.isfinite(loss):
        raise InvalidUpdateError(f"{protocol.TRAIN_LOSS} must be a finite number, got {loss!r}")
    steps = metrics.get(protocol.TRAIN_STEPS)
    epsilon = metrics.get(protocol.DP_EPSILON)
    if epsilon is not None and (type(epsilon) not in (int, float) or not epsilon >= 0):
        raise InvalidUpdateError(
            f"{protocol.DP_EPSILON} must be a non-negative number, got {epsilon!r}"
        )
    if epsilon is None:
        # Only strategies that read it (FedNova) refuse a reply without a valid count.
        valid = type(steps) is int and steps > 0
        return ReplyMetrics(num_examples, float(loss), steps=steps if valid else None)
    noise, rate = metrics.get(protocol.DP_NOISE), metrics.get(protocol.DP_RATE)
    if not (
        type(noise) in (int, float)
        and noise > 0
        and type(rate) in (int, float)
        and 0 < rate <= 1
        and type(steps) is int
        and steps > 0
    ):
        raise InvalidUpdateError(
            f"a DP-SGD reply needs {protocol.DP_NOISE} > 0, {protocol.DP_RATE} in (0, 1] and "
            f"{protocol.TRAIN_STEPS} > 0, got {noise!r}, {rate!r}, {steps!r}"
        )
    return ReplyMetrics(
        num_examples, float(loss), float(epsilon), (float(noise), float(rate), steps), steps
    )


def read_update(
    content: RecordDict,
    layout: Mapping[str, tuple[int, ...]],
    compression: UplinkCompression,
    server_round: int,
    max_norm: float = 0.0,
) -> Update:
    """The delta and metrics of a reply, checked against ``layout`` and the run's
    compression (names, dtypes, shapes, sparse indices, scales, finite values) and,
    when ``max_norm > 0``, rejected if its L2 norm exceeds it (unlike
    ``strategy.clip-norm``, which scales it down)."""
    if protocol.DELTA not in content.array_records:
        raise InvalidUpdateError(f"reply has no '{protocol.DELTA}' record")
    metrics = read_metrics(content)
    delta = compression.decode(content.array_records[protocol.DELTA], layout, server_round)
    if max_norm > 0:
        norm = global_norm(delta)
        if norm > max_norm:
            raise InvalidUpdateError(f"update norm {norm:.4g} exceeds max-update-norm {max_norm:g}")
    return Update(delta, metrics)
