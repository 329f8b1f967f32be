"""What a head strategy decides: which tensors train in a round, and whether the
head is set from the sites' data before round 1.

A round is in one of three phases. ``joint``: everything trainable trains (the
head and LoRA, today's behaviour). ``head``: only the classification head trains;
LoRA is frozen and its delta is not sent. ``body``: LoRA trains and the head is
frozen and not sent. The phase is a function of the round number and the config
alone, so the server (which tensors a valid reply holds) and every site (what to
freeze) agree on it without a message, and a resumed run is in the phase its
round says. Tensors that are not sent keep their global value bit for bit: the
server steps only the tensors it received.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import ClassVar, TypeVar

from fedelta.config import RunConfig
from fedelta.tensors import is_head

JOINT, HEAD, BODY = "joint", "head", "body"
"""The phases of a round: everything trains, only the head, or everything but the head."""

V = TypeVar("V")


def trains(phase: str, name: str) -> bool:
    """Whether trainable tensor ``name`` trains (and is sent) in ``phase``."""
    if phase == HEAD:
        return is_head(name)
    if phase == BODY:
        return not is_head(name)
    return True


def select(phase: str, names: Iterable[str]) -> set[str]:
    """The tensors of ``names`` that train in ``phase``."""
    return {n for n in names if trains(phase, n)}


def select_layout(phase: str, layout: Mapping[str, V]) -> dict[str, V]:
    """The entries of ``layout`` (names to shapes) that train in ``phase``."""
    return {n: v for n, v in layout.items() if trains(phase, n)}


class HeadStrategy:
    """How the classification head is treated over a run (``strategy.head``)."""

    name: ClassVar[str]
    summary: ClassVar[str]
    paper: ClassVar[str] = ""
    initialises: ClassVar[bool] = False
    """Sets the head from the sites' class statistics before round 1 (one extra
    message per site, see :mod:`fedelta.strategies.heads.ncm`)."""
    phased: ClassVar[bool] = False
    """Some rounds train only part of the model (needs a factor-space LoRA rule: the
    folding rules fold every module's update each round)."""
    trains_lora: ClassVar[bool] = True
    """Some round trains LoRA (``strategy.head-rounds`` must leave one)."""

    def __init__(self, head_rounds: int = 0, num_rounds: int = 1) -> None:
        self.head_rounds = head_rounds
        self.num_rounds = num_rounds

    @classmethod
    def from_config(cls, config: RunConfig) -> HeadStrategy:
        return cls(config.strategy.head_rounds, config.num_server_rounds)

    def phase(self, server_round: int) -> str:
        """The phase of ``server_round`` (1-based)."""
        return JOINT
