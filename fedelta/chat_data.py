"""Chat data for instruction tuning: every source becomes ``messages`` + ``topic`` rows.

``messages`` is a list of ``{"role", "content"}`` turns (user, assistant, and an
optional leading system turn), the form tokenizers' chat templates take;
``topic`` names where a chat came from, which the ``topic`` partitioner uses
to give each site whole topics. Sources: the built-in chatterbot corpus (one
YAML file per topic) and local JSON/JSONL/CSV/Parquet files with a ``messages``
column or ``instruction`` and ``response`` columns (and optionally ``topic``).
"""

from __future__ import annotations

from pathlib import Path

import datasets
import yaml

MESSAGES, TOPIC = "messages", "topic"
"""Columns of every chat table."""
INSTRUCTION, RESPONSE = "instruction", "response"
ROLES = ("system", "user", "assistant")


class ChatDataError(ValueError):
    """A chat source cannot be used; the message names the file and row."""


def is_chat_table(table: datasets.Dataset) -> bool:
    """Whether a table holds chats (``messages``, or ``instruction`` and ``response``)."""
    columns = set(table.column_names)
    return MESSAGES in columns or {INSTRUCTION, RESPONSE} <= columns


def read_chatterbot(folder: Path) -> datasets.Dataset:
    """The chatterbot corpus: each YAML file is a topic, each conversation alternates
    user and assistant turns (a trailing unanswered user turn is dropped).

    The corpus repeats many conversations verbatim (2,026 entries, 899 distinct in
    chatterbot-corpus 1.3.3); repeats are dropped, or a held-out chat would also be
    a training chat and the held-out loss would measure memorisation."""
    rows: list[dict] = []
    seen: set[tuple[str, ...]] = set()
    files = sorted(folder.glob("*.yml"))
    if not files:
        raise ChatDataError(f"chat corpus folder '{folder}' has no .yml files")
    for path in files:
        document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for number, turns in enumerate(document.get("conversations", [])):
            texts = [str(t).strip() for t in turns if t is not None and str(t).strip()]
            texts = texts[: len(texts) // 2 * 2]
            if not texts or tuple(texts) in seen:
                continue
            seen.add(tuple(texts))
            messages = [{"role": ROLES[1 + i % 2], "content": text} for i, text in enumerate(texts)]
            _check_messages(messages, f"{path}, conversation {number}")
            rows.append({MESSAGES: messages, TOPIC: path.stem})
    return datasets.Dataset.from_list(rows)


def normalise_chats(table: datasets.Dataset, source: str | Path) -> datasets.Dataset:
    """``messages`` + ``topic`` rows from a table with chats or instruction/response pairs;
    every chat is checked (roles, order, non-empty, ends with an assistant turn)."""
    if not is_chat_table(table):
        raise ChatDataError(
            f"data file '{source}' holds no chats: it needs a '{MESSAGES}' column or "
            f"'{INSTRUCTION}' and '{RESPONSE}' columns (columns: {', '.join(table.column_names)})"
        )
    topics = table[TOPIC] if TOPIC in table.column_names else [""] * len(table)
    if MESSAGES in table.column_names:
        chats = [
            [{"role": str(m["role"]), "content": str(m["content"])} for m in (row or [])]
            for row in table[MESSAGES]
        ]
    else:
        chats = [
            [
                {"role": "user", "content": str(i or "")},
                {"role": "assistant", "content": str(r or "")},
            ]
            for i, r in zip(table[INSTRUCTION], table[RESPONSE], strict=True)
        ]
    for number, messages in enumerate(chats):
        _check_messages(messages, f"data file '{source}', row {number}")
    return datasets.Dataset.from_dict(
        {MESSAGES: chats, TOPIC: ["" if t is None else str(t) for t in topics]}
    )


def _check_messages(messages: list[dict], where: str) -> None:
    if not messages:
        raise ChatDataError(f"{where}: the chat has no turns")
    body = messages[1:] if messages[0]["role"] == "system" else messages
    if not body or body[-1]["role"] != "assistant":
        raise ChatDataError(f"{where}: the chat must end with an assistant turn")
    for i, message in enumerate(body):
        expected = ROLES[1 + i % 2]
        if message["role"] != expected:
            raise ChatDataError(
                f"{where}: turn {i} has role '{message['role']}', expected '{expected}' "
                "(user and assistant turns alternate, after an optional system turn)"
            )
        if not message["content"].strip():
            raise ChatDataError(f"{where}: turn {i} ({message['role']}) is empty")
