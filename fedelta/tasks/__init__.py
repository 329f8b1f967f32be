"""Tasks: what a federation fine-tunes for (classification or causal LM on chats)."""

from fedelta.config import RunConfig
from fedelta.registry import Registry
from fedelta.tasks.base import EvalResult, Task, perplexity
from fedelta.tasks.causal_lm import CausalLM
from fedelta.tasks.classification import Classification

TASKS: Registry[type[Task]] = Registry("model.task", (Classification, CausalLM))
"""Task classes by ``model.task`` name."""


def build_task(config: RunConfig) -> Task:
    """The task ``model.task`` names, with the run's length and packing settings."""
    return TASKS[config.model.task].from_config(config)


__all__ = [
    "TASKS",
    "CausalLM",
    "Classification",
    "EvalResult",
    "Task",
    "build_task",
    "perplexity",
]
