"""A run's folder and the config it was started with: what a resume may change.

The folder keeps the exact config of the run (``config.toml``), a metrics row and a
checkpoint per completed round. A resume reads the config back and refuses any
change that would make it a different run; a fresh run refuses a folder that
already holds one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedelta.config import RUN_CONFIG_FILE, ConfigError, RunConfig, load_config
from fedelta.data import label_names, load_corpus
from fedelta.merging.rounds import RoundStates, merged_export
from fedelta.privacy.accounting import PrivacyAccountant
from fedelta.server.checkpoint import FILENAME as CHECKPOINT_FILE
from fedelta.server.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedelta.server.evaluation import CentralEvaluator
from fedelta.server.export import ADAPTER_DIR, export_adapter
from fedelta.server.generations import generate_report, write_generations
from fedelta.server.metrics import MetricsLog, summarise, write_summary
from fedelta.strategies import Strategy
from fedelta.tensors import TensorDict

log = logging.getLogger("fedelta")

RESUMABLE_KEYS = frozenset({"num-server-rounds", "output-dir", "resume"})
"""Keys a resumed run may change; any other change would make it a different run."""


class RunFolder:
    """A run's folder as the run goes: its config, a metrics row and a checkpoint per
    completed round, and every round's global model when the export merges them."""

    def __init__(self, run_dir: Path, config: RunConfig) -> None:
        self.run_dir = run_dir
        self.config = config
        self.metrics = MetricsLog(run_dir)
        self.round_states = RoundStates(run_dir)

    def prepare(self, resume: bool) -> None:
        """Create the folder and write the config into it, after checking that a resume
        keeps the saved config and that a fresh run does not overwrite another."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            if changed := config_changes(self.run_dir, self.config):
                raise ConfigError(
                    f"cannot resume '{self.run_dir}' with a different config: "
                    f"{', '.join(changed)} changed (only num-server-rounds may)"
                )
        elif (self.run_dir / CHECKPOINT_FILE).exists():
            raise ConfigError(
                f"'{self.run_dir}' already holds a run; resume it or choose another output dir"
            )
        (self.run_dir / RUN_CONFIG_FILE).write_text(self.config.to_toml(), encoding="utf-8")

    def record(
        self,
        row: dict[str, Any],
        global_state: Mapping[str, torch.Tensor],
        strategy: Strategy,
        rng: np.random.Generator,
        accountants: Mapping[str, PrivacyAccountant],
    ) -> None:
        """Record the round, then checkpoint it; a crash between the two is undone on resume."""
        self.metrics.append(row)
        if self.config.export.merge != "none":
            self.round_states.record(row["round"], global_state)
        tensors, meta = strategy.state_dict()
        state = dict(global_state)
        privacy = {site: spent.to_meta() for site, spent in accountants.items()}
        save_checkpoint(
            self.run_dir,
            Checkpoint(row["round"], state, tensors, meta, rng.bit_generator.state, privacy),
        )

    def restore(
        self, strategy: Strategy
    ) -> tuple[TensorDict, np.random.Generator, int, dict[str, PrivacyAccountant]]:
        """Resume from the last checkpoint: the strategy's state is loaded and rows written
        after it are dropped. Returns the global state, the server RNG, the rounds done
        and what each site spent under DP-SGD."""
        checkpoint = load_checkpoint(self.run_dir)
        strategy.load_state_dict(checkpoint.strategy_tensors, checkpoint.strategy_meta)
        accountants = {
            site: PrivacyAccountant.from_meta(meta) for site, meta in checkpoint.privacy.items()
        }
        rng = np.random.default_rng()
        rng.bit_generator.state = checkpoint.rng_state
        self.metrics.truncate_after(checkpoint.server_round)
        log.info("resuming after round %d from %s", checkpoint.server_round, self.run_dir)
        return checkpoint.global_state, rng, checkpoint.server_round, accountants

    def finish(
        self,
        evaluator: CentralEvaluator,
        strategy: Strategy,
        global_state: TensorDict,
        started: float,
        stopped: str | None,
    ) -> dict[str, Any]:
        """Export the adapter (the last global model, or the merge across rounds that
        ``export.merge`` asks for) and write the summary of the run started at
        ``started`` (``time.monotonic()``); ``stopped`` says why it ended early."""
        config = self.config
        exported = global_state
        if config.export.merge != "none":
            exported = merged_export(
                config.export, self.run_dir, config.num_server_rounds, evaluator.model, config.seed
            )
        adapter = self.run_dir / ADAPTER_DIR
        export_adapter(
            evaluator.model,
            exported,
            evaluator.label_names,
            config.model.name,
            adapter,
            task=config.model.task,
        )
        summary = summarise(self.metrics.rows(), time.monotonic() - started)
        summary["adapter"] = str(adapter)
        summary["strategy"] = getattr(strategy, "name", type(strategy).__name__)
        if stopped:
            summary["stopped-early"] = stopped
        if exported is not global_state:
            summary["export-merge"] = config.export.merge
            if config.central_evaluation:
                summary |= {
                    f"exported-{k}": v
                    for k, v in evaluator.task.metrics(evaluator(exported), "test").items()
                }
        generation = config.generation
        if config.model.task == "causal-lm" and (
            generation.num_prompts or generation.prompt_list()
        ):
            test = load_corpus(config.data, config.seed).test
            summary["generations"] = generate_report(evaluator, generation, test, exported)
            write_generations(self.run_dir, summary["generations"])
        write_summary(self.run_dir, summary)
        return summary


def config_changes(run_dir: Path, config: RunConfig) -> list[str]:
    """Keys whose value in ``config`` differs from the run saved in ``run_dir`` (label
    names filled in as the run saved them), except those a resumed run may change."""
    previous = load_config(run_dir / RUN_CONFIG_FILE, follow_renames=True).to_flat()
    current = with_label_names(config).to_flat()
    return sorted(
        key
        for key, value in current.items()
        if previous.get(key) != value and key not in RESUMABLE_KEYS
    )


def with_label_names(config: RunConfig) -> RunConfig:
    """``config`` with ``data.labels`` filled in from the server's corpus, so sites that
    train on their own files give each label the same class id as the server."""
    if config.data.labels or config.model.task != "classification":
        return config
    names = label_names(config.data, config.seed)
    if any("," in name for name in names):
        raise ConfigError(
            f"label names {list(names)} contain ',', which data.labels cannot carry; "
            "rename the labels in the data file"
        )
    return config.replace(**{"data.labels": ",".join(names)})
