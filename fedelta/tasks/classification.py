"""Sequence classification: labelled text, a new head, accuracy."""

from __future__ import annotations

from collections.abc import Callable

import datasets
import torch
from peft import TaskType
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerBase

from fedelta.data import LABEL, TEXT
from fedelta.tasks.base import EvalResult, Task
from fedelta.tasks.pooling import apply_pooling, resolve_pooling


class Classification(Task):
    name = "classification"
    peft_task_type = TaskType.SEQ_CLS
    data_kind = "labelled text"
    eval_batch_size = 64
    partitioners = ("iid", "dirichlet")
    pools = True
    calibrates = True
    has_head = True

    @classmethod
    def load_pretrained(cls, path: str, num_labels: int, pooling: str = "cls") -> torch.nn.Module:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
        return apply_pooling(model, resolve_pooling(pooling, path), path)

    def accepts(self, dataset: datasets.Dataset) -> bool:
        return {TEXT, LABEL} <= set(dataset.column_names)

    def examples(
        self, dataset: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, *, train: bool
    ) -> datasets.Dataset:
        return dataset

    def collate_fn(
        self, tokenizer: PreTrainedTokenizerBase
    ) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
        """Tokenised, dynamically padded texts with their class ids as ``labels``."""

        def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
            batch = tokenizer(
                [r[TEXT] for r in rows],
                truncation=True,
                max_length=self.max_length,
                padding=True,
                return_tensors="pt",
            )
            batch["labels"] = torch.tensor([r[LABEL] for r in rows], dtype=torch.long)
            return dict(batch)

        return collate

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, loader: DataLoader) -> EvalResult:
        """Mean cross-entropy and accuracy over every example."""
        model.eval()
        total_loss, correct, count = 0.0, 0, 0
        for batch in loader:
            out = model(**batch)
            n = int(batch["labels"].shape[0])
            total_loss += out.loss.item() * n
            correct += int((out.logits.argmax(dim=-1) == batch["labels"]).sum())
            count += n
        if count == 0:
            return EvalResult(loss=float("nan"), accuracy=float("nan"), examples=0)
        return EvalResult(loss=total_loss / count, accuracy=correct / count, examples=count)
