"""Chats to token ids with labels on the assistant's tokens only, and optional packing.

The chat template renders the whole conversation; each assistant turn's tokens
are found by rendering the conversation up to that turn twice, with and without
the turn (a prefix of the full rendering by construction of chat templates), so
the mask is right for any template: system prompts the template adds, special
tokens, multi-turn chats. Everything else is labelled ``-100`` (ignored by the
loss). A chat whose first response starts beyond ``max-length`` teaches nothing
and is dropped.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from fedelta.chat_data import MESSAGES

IGNORE = -100
"""Label of tokens the loss skips (PyTorch's and Hugging Face's convention)."""

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""ChatML, for tokenizers that ship without a chat template (base models)."""

log = logging.getLogger("fedelta")


@dataclass(frozen=True)
class TokenizedChat:
    input_ids: list[int]
    labels: list[int]
    """``input_ids`` on assistant tokens, :data:`IGNORE` elsewhere."""


class ChatTemplateError(ValueError):
    """The tokenizer's chat template does not render a conversation's prefixes as
    prefixes, so response tokens cannot be located."""


def tokenize_chat(
    messages: Sequence[dict], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> TokenizedChat | None:
    """Token ids and response-only labels, truncated to ``max_length``; ``None`` when
    no response token fits."""

    def ids(turns: Sequence[dict], generation_prompt: bool) -> list[int]:
        text = tokenizer.apply_chat_template(
            list(turns), tokenize=False, add_generation_prompt=generation_prompt
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    full = ids(messages, False)
    labels = [IGNORE] * len(full)
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        # A token that merges across the prompt/response boundary counts as response.
        start = _common_prefix(full, ids(messages[:turn], True))
        if start >= max_length:
            break
        upto = ids(messages[: turn + 1], False)
        end = _common_prefix(full, upto)
        if end < len(upto) - 1:
            raise ChatTemplateError(
                "the tokenizer's chat template renders a conversation's first turns "
                "differently from the same turns inside the whole conversation; "
                "response tokens cannot be located"
            )
        labels[start:end] = full[start:end]
    full, labels = full[:max_length], labels[:max_length]
    if all(label == IGNORE for label in labels):
        return None
    return TokenizedChat(full, labels)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


_CACHE: OrderedDict[tuple, list[TokenizedChat]] = OrderedDict()
_CACHE_SIZE = 8


def tokenize_chats(
    dataset: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> list[TokenizedChat]:
    """Every chat of ``dataset`` tokenised, chats without a response token in reach
    dropped; cached per process, since a client tokenises its data every round."""
    key = (dataset._fingerprint, tokenizer.name_or_path, len(tokenizer), max_length)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    chats = [tokenize_chat(m, tokenizer, max_length) for m in dataset[MESSAGES]]
    kept = [c for c in chats if c is not None]
    if len(kept) < len(chats):
        log.warning(
            "%d of %d chats have no response token within model.max-length = %d; they are left out",
            len(chats) - len(kept),
            len(chats),
            max_length,
        )
    _CACHE[key] = kept
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return kept


def pack(chats: Sequence[TokenizedChat], block: int) -> list[TokenizedChat]:
    """Concatenate chats and cut the stream into ``block``-token pieces (the last,
    shorter one kept); each piece attends across the chats it holds."""
    ids = [t for chat in chats for t in chat.input_ids]
    labels = [t for chat in chats for t in chat.labels]
    pieces = [
        TokenizedChat(ids[i : i + block], labels[i : i + block]) for i in range(0, len(ids), block)
    ]
    return [p for p in pieces if any(label != IGNORE for label in p.labels)]


def pad_batch(chats: Sequence[TokenizedChat], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (padding ignored)."""
    width = max(len(c.input_ids) for c in chats)
    input_ids = torch.full((len(chats), width), pad_id, dtype=torch.long)
    labels = torch.full((len(chats), width), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(chats), width), dtype=torch.long)
    for row, chat in enumerate(chats):
        n = len(chat.input_ids)
        input_ids[row, :n] = torch.tensor(chat.input_ids)
        labels[row, :n] = torch.tensor(chat.labels)
        attention[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
