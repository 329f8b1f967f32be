"""``joint``: the head and LoRA train together in every round (the default)."""

from __future__ import annotations

from fedelta.strategies.heads.base import HeadStrategy


class Joint(HeadStrategy):
    """The freshly initialised head trains with the adapter from round 1 on."""

    name = "joint"
    summary = "head and LoRA train together every round"
