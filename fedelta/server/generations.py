"""Sample answers of a causal-LM run, before and after federated training.

Loss and perplexity say whether a chat model improved; its answers say how. At
the end of a run the server answers a few fixed prompts with the base model and
with the final global adapter (greedy, so the report is reproducible), and
writes them to ``generations.md`` and to ``summary.json``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import datasets
import torch

from fedelta.chat_data import MESSAGES, TOPIC
from fedelta.config import GenerationConfig
from fedelta.server.evaluation import CentralEvaluator, load_global_state
from fedelta.tasks.generation import generate_answers

GENERATIONS_FILE = "generations.md"


def sample_prompts(config: GenerationConfig, test: datasets.Dataset) -> list[tuple[str, str]]:
    """``(prompt, reference answer)`` pairs: the configured prompts (no reference), else
    the first question and answer of ``num-prompts`` held-out chats, distinct questions
    from as many topics as possible, in the split's order."""
    if config.prompt_list():
        return [(prompt, "") for prompt in config.prompt_list()]
    candidates: dict[str, tuple[str, str]] = {}
    for messages, topic in zip(test[MESSAGES], test[TOPIC], strict=True):
        turns = [m for m in messages if m["role"] != "system"]
        candidates.setdefault(turns[0]["content"], (topic, turns[1]["content"]))
    chosen: list[str] = []
    topics: set[str] = set()
    for new_topics_only in (True, False):
        for prompt, (topic, _) in candidates.items():
            if len(chosen) < config.num_prompts and prompt not in chosen:
                if topic not in topics or not new_topics_only:
                    chosen.append(prompt)
                    topics.add(topic)
    return [(prompt, candidates[prompt][1]) for prompt in chosen]


def generate_report(
    evaluator: CentralEvaluator,
    config: GenerationConfig,
    test: datasets.Dataset,
    final_state: Mapping[str, torch.Tensor],
) -> list[dict[str, Any]]:
    """Answers of the base model and of the final global model to the same prompts."""
    pairs = sample_prompts(config, test)
    prompts = [prompt for prompt, _ in pairs]
    load_global_state(evaluator.model, evaluator.initial_state)
    before = generate_answers(evaluator.model, evaluator.tokenizer, prompts, config.max_new_tokens)
    load_global_state(evaluator.model, final_state)
    after = generate_answers(evaluator.model, evaluator.tokenizer, prompts, config.max_new_tokens)
    return [
        {"prompt": p, "reference": r, "base-model": b, "fine-tuned": a}
        for (p, r), b, a in zip(pairs, before, after, strict=True)
    ]


def write_generations(run_dir: Path, rows: list[dict[str, Any]]) -> Path:
    """``generations.md``: each prompt with the reference, base and fine-tuned answers."""
    parts = ["# Sample answers\n", "Greedy decoding; the base model has no adapter.\n"]
    for number, row in enumerate(rows, 1):
        parts.append(f"## {number}. {row['prompt']}\n")
        if row["reference"]:
            parts.append(f"- **reference**: {row['reference']}")
        parts.append(f"- **base model**: {row['base-model']}")
        parts.append(f"- **fine-tuned**: {row['fine-tuned']}\n")
    path = run_dir / GENERATIONS_FILE
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
