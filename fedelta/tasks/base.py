"""What a task decides: which model class, how examples become batches, what is measured.

Everything else in a federation (adapters, deltas, strategies, codecs) is the
same for every task: it only ever sees the trainable tensors.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import datasets
import torch
from peft import TaskType
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from fedelta.config import RunConfig
from fedelta.data import DataError


@dataclass(frozen=True)
class EvalResult:
    loss: float
    """Mean loss per example (classification) or per response token (causal LM)."""
    accuracy: float
    """Share of examples classified right, or of response tokens predicted right."""
    examples: int


class Task(ABC):
    """One kind of fine-tuning; built from the run config by :func:`fedelta.tasks.build_task`."""

    name: ClassVar[str]
    peft_task_type: ClassVar[TaskType]
    data_kind: ClassVar[str]
    """What the task trains on: ``labelled text`` or ``chats``."""
    eval_batch_size: ClassVar[int]
    partitioners: ClassVar[tuple[str, ...]]
    """The ``data.partitioner`` values that can split this task's data."""
    packs: ClassVar[bool] = False
    """Can pack tokenised examples into blocks (``data.packing``)."""
    pools: ClassVar[bool] = False
    """Reads one pooled vector per example (``model.pooling`` applies)."""
    calibrates: ClassVar[bool] = False
    """Has a label prior that a calibrated loss can correct for (``loss``)."""
    has_head: ClassVar[bool] = False
    """Adds a new classification head, which ``strategy.head`` can treat apart."""

    def __init__(self, max_length: int) -> None:
        self.max_length = max_length

    @classmethod
    def from_config(cls, config: RunConfig) -> Task:
        """The task with a run's length settings."""
        return cls(config.model.max_length)

    @classmethod
    @abstractmethod
    def load_pretrained(cls, path: str, num_labels: int, pooling: str = "cls") -> torch.nn.Module:
        """The pretrained model for this task (a new head of ``num_labels`` if it has one,
        reading tokens pooled as ``pooling`` says, where the task pools)."""

    @classmethod
    def prepare_tokenizer(cls, tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
        """Fill in what the task needs and the checkpoint lacks (a pad token, say)."""
        return tokenizer

    @abstractmethod
    def accepts(self, dataset: datasets.Dataset) -> bool:
        """Whether ``dataset`` holds this task's kind of examples."""

    def check_data(self, dataset: datasets.Dataset, source: str) -> None:
        """Refuse data of the other task before anything is trained."""
        if not self.accepts(dataset):
            raise DataError(
                f"model.task = {self.name!r} trains on {self.data_kind}, but {source} "
                f"holds other data (columns: {', '.join(dataset.column_names)})"
            )

    def make_loader(
        self,
        dataset: datasets.Dataset,
        tokenizer: PreTrainedTokenizerBase,
        batch_size: int,
        *,
        train: bool,
        seed: int = 0,
    ) -> DataLoader:
        """Batches for training (shuffled with ``seed``) or for evaluation (in order)."""
        generator = torch.Generator().manual_seed(seed) if train else None
        return DataLoader(
            self.examples(dataset, tokenizer, train=train),
            batch_size=batch_size,
            shuffle=train,
            generator=generator,
            collate_fn=self.collate_fn(tokenizer),
        )

    @abstractmethod
    def examples(
        self, dataset: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, *, train: bool
    ) -> Sequence[Any]:
        """What the loader draws from (rows, or pre-tokenised sequences)."""

    @abstractmethod
    def collate_fn(
        self, tokenizer: PreTrainedTokenizerBase
    ) -> Callable[[list[Any]], dict[str, torch.Tensor]]:
        """Turns drawn examples into a model batch with ``labels``."""

    def example_mean_loss(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """The mean over the batch's examples of each example's own loss, so that one
        example's gradient depends on that example alone (what DP-SGD clips)."""
        return model(**batch).loss

    @abstractmethod
    def evaluate(self, model: torch.nn.Module, loader: DataLoader) -> EvalResult:
        """Loss and accuracy over every example of ``loader``."""

    def metrics(self, result: EvalResult, prefix: str) -> dict[str, Any]:
        """The metrics row entries for ``result`` (``prefix``: test, federated)."""
        return {f"{prefix}-accuracy": result.accuracy, f"{prefix}-loss": result.loss}


def perplexity(loss: float) -> float:
    """``exp(loss)``, infinite rather than an overflow error for a diverged model."""
    return math.exp(loss) if loss < 700 else math.inf
