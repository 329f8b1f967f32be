"""Tasks: what a federation fine-tunes for (classification or causal LM on chats)."""

from fedelta.config import RunConfig
from fedelta.tasks.base import EvalResult, Task, perplexity
from fedelta.tasks.causal_lm import CausalLM
from fedelta.tasks.classification import Classification

TASK_TYPES: dict[str, type[Task]] = {Classification.name: Classification, CausalLM.name: CausalLM}
"""Task classes by ``model.task`` name."""


def build_task(config: RunConfig) -> Task:
    """The task ``model.task`` names, with the run's length and packing settings."""
    if config.model.task == CausalLM.name:
        return CausalLM(config.model.max_length, packing=config.data.packing)
    return Classification(config.model.max_length)


__all__ = [
    "CausalLM",
    "Classification",
    "EvalResult",
    "TASK_TYPES",
    "Task",
    "build_task",
    "perplexity",
]
