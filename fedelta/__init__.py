"""fedelta: federated fine-tuning of language models with LoRA and sparse deltas on Flower."""

__version__ = "0.1.0"
