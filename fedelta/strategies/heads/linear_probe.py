"""Linear probing: every round trains only the head on the frozen pretrained features.

Tramèr and Boneh, "Differentially Private Learning Needs Better Features (or Much
More Data)", ICLR 2021. Under differential privacy the noise a step adds grows with
the number of trained values while the signal per example does not, so a linear
model on good frozen features beats end-to-end private training at the same
epsilon. Without privacy it is the classic transfer baseline (and the first phase
of LP-FT, :mod:`fedelta.strategies.heads.lp_ft`).

Here every round trains only the head (LoRA stays at its initialisation, which
leaves the base model unchanged, and no LoRA delta is sent), so sites upload a few
kilobytes per round and backpropagate through the head alone.
"""

from __future__ import annotations

from fedelta.strategies.heads.base import HEAD, HeadStrategy


class LinearProbe(HeadStrategy):
    name = "linear-probe"
    summary = "every round trains only the head on the frozen features (LoRA never trains)"
    paper = "Tramèr and Boneh, ICLR 2021"
    phased = True
    trains_lora = False

    def phase(self, server_round: int) -> str:
        return HEAD
