"""Causal language modelling on chats: next-token loss on the assistant's tokens."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import datasets
import torch
import torch.nn.functional as F
from peft import TaskType
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from fedelta.chat_data import MESSAGES
from fedelta.config import RunConfig
from fedelta.tasks.base import EvalResult, Task, perplexity
from fedelta.tasks.chat_tokenization import (
    CHATML_TEMPLATE,
    IGNORE,
    TokenizedChat,
    pack,
    pad_batch,
    tokenize_chats,
)


class CausalLM(Task):
    name = "causal-lm"
    peft_task_type = TaskType.CAUSAL_LM
    data_kind = "chats"
    eval_batch_size = 8
    partitioners = ("iid", "topic")
    packs = True
    """Small: the logits of a batch are batch x length x vocabulary floats."""

    def __init__(self, max_length: int, packing: bool = False) -> None:
        super().__init__(max_length)
        self.packing = packing

    @classmethod
    def from_config(cls, config: RunConfig) -> CausalLM:
        return cls(config.model.max_length, packing=config.data.packing)

    @classmethod
    def load_pretrained(cls, path: str, num_labels: int, pooling: str = "cls") -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(path)

    @classmethod
    def prepare_tokenizer(cls, tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
        """A ChatML template for tokenizers without one, and a pad token (padding is
        masked out of attention and loss, so which token it is does not matter)."""
        if tokenizer.chat_template is None:
            tokenizer.chat_template = CHATML_TEMPLATE
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        return tokenizer

    def accepts(self, dataset: datasets.Dataset) -> bool:
        return MESSAGES in dataset.column_names

    def examples(
        self, dataset: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, *, train: bool
    ) -> list[TokenizedChat]:
        """Tokenised chats with response-only labels; packed into ``max-length`` blocks
        for training when ``data.packing`` is on (evaluation never packs)."""
        chats = tokenize_chats(dataset, tokenizer, self.max_length)
        return pack(chats, self.max_length) if train and self.packing else chats

    def collate_fn(
        self, tokenizer: PreTrainedTokenizerBase
    ) -> Callable[[list[TokenizedChat]], dict[str, torch.Tensor]]:
        return functools.partial(pad_batch, pad_id=tokenizer.pad_token_id)

    def example_mean_loss(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Each chat's mean loss over its own answer tokens, averaged over chats
        (Hugging Face's loss averages over the batch's tokens, which couples examples)."""
        labels = batch["labels"]
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        wanted = labels[:, 1:]
        per_token = F.cross_entropy(
            logits[:, :-1].transpose(1, 2).float(), wanted, ignore_index=IGNORE, reduction="none"
        )
        counted = (wanted != IGNORE).sum(dim=1).clamp_min(1)
        return (per_token.sum(dim=1) / counted).mean()

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, loader: DataLoader) -> EvalResult:
        """Cross-entropy per response token and next-token accuracy on them."""
        model.eval()
        loss_sum, correct, tokens, examples = 0.0, 0, 0, 0
        for batch in loader:
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
            targets = batch["labels"][:, 1:]
            mask = targets != IGNORE
            predicted = logits[:, :-1][mask].float()
            wanted = targets[mask]
            loss_sum += F.cross_entropy(predicted, wanted, reduction="sum").item()
            correct += int((predicted.argmax(dim=-1) == wanted).sum())
            tokens += int(mask.sum())
            examples += int(batch["input_ids"].shape[0])
        if tokens == 0:
            return EvalResult(loss=float("nan"), accuracy=float("nan"), examples=0)
        return EvalResult(loss=loss_sum / tokens, accuracy=correct / tokens, examples=examples)

    def metrics(self, result: EvalResult, prefix: str) -> dict[str, Any]:
        return {
            f"{prefix}-loss": result.loss,
            f"{prefix}-perplexity": perplexity(result.loss),
            f"{prefix}-token-accuracy": result.accuracy,
        }
