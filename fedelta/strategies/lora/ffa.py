"""FFA-LoRA: A frozen at a shared seeded initialisation, only B trained and sent
(Sun et al., "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024)."""

from __future__ import annotations

from fedelta.strategies.lora.base import LoraAggregation


class FfaLora(LoraAggregation):
    """With A fixed and identical everywhere, ``scale * B @ A`` is linear in B, so the
    mean of B is the mean of the updates: exact, half the upload, and clipping plus
    noise on B bounds the weight update (the adapter to use under DP)."""

    name = "ffa"
    summary = "A frozen from a shared seed, B trained and sent (exact, half the bytes)"
    exact = True
    linear = True
    dp_friendly = True
    freezes_a = True
    folds_tail = True
