"""The centralised baseline: the same model, adapter and optimizer on pooled data.

It answers "what does federating cost?": train on every client's examples pooled
together, for the same total number of optimizer steps the federation spends,
and evaluate on the same held-out test split.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import Any

import torch

from fedelta.build import model_spec
from fedelta.config import RunConfig
from fedelta.data import cycle, load_corpus
from fedelta.models import build_model, load_tokenizer
from fedelta.seeding import seed_everything
from fedelta.server.sampling import sample_size
from fedelta.tasks import build_task
from fedelta.training import train


def federated_step_budget(config: RunConfig) -> int:
    """Optimizer steps a federation with ``config`` spends in total (all clients)."""
    clients = sample_size(
        config.simulation.num_supernodes, config.fraction_train, config.min_train_nodes
    )
    return config.num_server_rounds * clients * config.local_steps


def train_centralised(
    config: RunConfig,
    steps: int,
    eval_every: int,
    on_eval: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Train on the pooled client data; one row per evaluation of the test split."""
    if config.local_steps <= 0:
        raise ValueError("the centralised baseline needs local-steps > 0 to size its budget")
    corpus = load_corpus(config.data, config.seed)
    spec = model_spec(config, corpus.num_labels)
    task = build_task(config)
    model, tokenizer = build_model(spec), load_tokenizer(config.model.name, config.model.task)
    seed_everything(config.seed)
    train_loader = task.make_loader(
        corpus.pool, tokenizer, config.batch_size, train=True, seed=config.seed
    )
    test_loader = task.make_loader(corpus.test, tokenizer, task.eval_batch_size, train=False)
    accumulation = config.gradient_accumulation_steps
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    stream = cycle(train_loader, steps * accumulation)
    rows: list[dict[str, Any]] = []
    done, started = 0, time.monotonic()
    while done < steps:
        chunk = min(eval_every, steps - done)
        result = train(
            model,
            itertools.islice(stream, chunk * accumulation),
            lr=config.lr,
            optimizer=optimizer,
            accumulation=accumulation,
        )
        done += chunk
        row = {
            "step": done,
            **task.metrics(task.evaluate(model, test_loader), "test"),
            "train-loss": result.loss,
            "wall-seconds": round(time.monotonic() - started, 2),
        }
        rows.append(row)
        if on_eval:
            on_eval(row)
    return rows
