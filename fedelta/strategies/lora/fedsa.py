"""FedSA-LoRA: A shared and averaged, B kept on each client
(Guo et al., "Selective Aggregation for LoRA in Federated Learning", ICLR 2025)."""

from __future__ import annotations

from fedelta.strategies.lora.base import LoraAggregation


class FedSaLora(LoraAggregation):
    """A learns what is common, each client's B what is its own: a personalised model
    per site. The server's own adapter has B at its initialisation, so its central
    accuracy reflects the shared part only; federated evaluation uses each site's B."""

    name = "fedsa"
    summary = "A averaged, B kept local (personalised)"
    exact = False
    linear = True
    dp_friendly = True
    local_b = True
