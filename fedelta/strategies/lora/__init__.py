"""The LoRA aggregation family, by config name (``strategy.lora``)."""

from fedelta.registry import Registry
from fedelta.strategies.lora.base import LoraAggregation
from fedelta.strategies.lora.fedsa import FedSaLora
from fedelta.strategies.lora.ffa import FfaLora
from fedelta.strategies.lora.folding import FedExLora, FLoraStacking, FoldingLora
from fedelta.strategies.lora.naive import NaiveLora

LORA_AGGREGATIONS: Registry[type[LoraAggregation]] = Registry(
    "strategy.lora", (NaiveLora, FfaLora, FedSaLora, FedExLora, FLoraStacking)
)

__all__ = [
    "LORA_AGGREGATIONS",
    "FLoraStacking",
    "FedExLora",
    "FedSaLora",
    "FfaLora",
    "FoldingLora",
    "LoraAggregation",
    "NaiveLora",
]
