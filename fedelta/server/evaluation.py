"""Central evaluation (the global adapter on the held-out test split, on the server)
and the folding of the sites' own evaluations."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from flwr.app import MetricRecord

from fedelta import protocol
from fedelta.build import model_spec
from fedelta.config import RunConfig
from fedelta.data import label_names, load_corpus
from fedelta.lora import FOLD_PREFIX, apply_fold
from fedelta.models import adapter_layout, cached_model, load_adapter_state
from fedelta.tasks import EvalResult, build_task


class CentralEvaluator:
    """Holds the server's model and test loader, built once per run.

    With ``central-evaluation = false`` and ``data.labels`` set, the server needs no
    data at all (a deployment whose data lives only at the sites)."""

    def __init__(self, config: RunConfig) -> None:
        self.task = build_task(config)
        self.label_names = label_names(config.data, config.seed)
        self.spec = model_spec(config, len(self.label_names))
        built = cached_model(self.spec)
        self.model, self.tokenizer, self.initial_state = (
            built.model,
            built.tokenizer,
            built.initial_state,
        )
        self.layout = adapter_layout(self.model)
        self.loader = None
        if config.central_evaluation:
            test = load_corpus(config.data, config.seed).test
            self.task.check_data(test, f"data '{config.data.name}'")
            self.loader = self.task.make_loader(
                test, self.tokenizer, self.task.eval_batch_size, train=False
            )

    def __call__(self, global_state: Mapping[str, torch.Tensor]) -> EvalResult:
        if self.loader is None:
            raise RuntimeError("central evaluation is off (central-evaluation = false)")
        load_global_state(self.model, global_state)
        return self.task.evaluate(self.model, self.loader)


def load_global_state(model: torch.nn.Module, global_state: Mapping[str, torch.Tensor]) -> None:
    """Load the server's global state (adapter tensors and exact folds) into ``model``."""
    load_adapter_state(
        model, {k: v for k, v in global_state.items() if not k.startswith(FOLD_PREFIX)}
    )
    apply_fold(
        model,
        {
            k.removeprefix(FOLD_PREFIX): v
            for k, v in global_state.items()
            if k.startswith(FOLD_PREFIX)
        },
    )


def federated_result(replies: Iterable[MetricRecord | None]) -> EvalResult:
    """The example-weighted mean of the sites' evaluation metrics; a reply without
    examples or with a non-finite loss or accuracy is left out (none left: NaN, 0)."""
    loss_sum = correct = count = 0
    for metrics in replies:
        n = metrics.get(protocol.NUM_EXAMPLES, 0) if metrics else 0
        if not n or not all(
            math.isfinite(metrics.get(k, math.nan)) for k in ("eval-loss", "eval-accuracy")
        ):
            continue
        loss_sum += metrics["eval-loss"] * n
        correct += metrics["eval-accuracy"] * n
        count += n
    if count == 0:
        return EvalResult(loss=math.nan, accuracy=math.nan, examples=0)
    return EvalResult(loss=loss_sum / count, accuracy=correct / count, examples=count)
