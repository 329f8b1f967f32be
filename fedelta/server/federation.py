"""The server's run over a Flower ``Grid``: sample sites, train, evaluate, checkpoint.

Each round: find the nodes and their site names (:mod:`fedelta.server.site_grid`),
sample sites with the server's seeded RNG, send every sampled node its training
message and hand each reply, as it arrives, to the round
(:mod:`fedelta.server.round`: validation, weighting, folding in), evaluate the new
global state centrally and on clients, append a metrics row and write a checkpoint
(:mod:`fedelta.server.run_folder`). A client that fails or sends an invalid update
is reported by site name and left out of the round; it never stops the run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from tqdm.auto import tqdm

from fedelta import protocol
from fedelta.build import build_strategy
from fedelta.compatibility import check_clients_match, check_config
from fedelta.compression import UplinkCompression
from fedelta.config import RunConfig
from fedelta.errors import UserError
from fedelta.privacy.accounting import PrivacyAccountant
from fedelta.privacy.secure_aggregation import SecAggPlus, SecureAggregationError
from fedelta.server.evaluation import CentralEvaluator, federated_result
from fedelta.server.head_init import HeadInitialisation, initialise_over_grid
from fedelta.server.metrics import format_table
from fedelta.server.round import TrainingRound, global_records, update_layout
from fedelta.server.run_folder import RunFolder, with_label_names
from fedelta.server.sampling import sample_sites
from fedelta.server.site_grid import SiteGrid
from fedelta.strategies import EmptyRoundError, Strategy
from fedelta.strategies.aggregators.base import SITE_WEIGHT
from fedelta.strategies.heads import build_head
from fedelta.tasks import build_task
from fedelta.tensors import Layout

log = logging.getLogger("fedelta")


class BudgetsSpentError(EmptyRoundError):
    """Too few sites have privacy budget left to train a round: the run ends early
    (and exports what it has)."""

    @classmethod
    def check(cls, exhausted: Iterable[str], available: int, min_train_nodes: int) -> None:
        """Raise when fewer than ``min_train_nodes`` sites can still train (both
        engines end a run with the same message)."""
        if available < min_train_nodes:
            raise cls(
                f"the privacy budgets of {', '.join(sorted(exhausted))} are spent: "
                f"{available} site(s) can still train, min-train-nodes is {min_train_nodes}"
            )


class ShortRoundError(EmptyRoundError, UserError):
    """A round got fewer usable updates than ``min-train-replies`` and ``short-round``
    says to stop; the last checkpoint is intact, so the run can be resumed."""


class Federation:
    """One federated run driven through a Flower ``Grid``."""

    def __init__(
        self,
        grid: Grid,
        config: RunConfig,
        run_dir: Path,
        *,
        strategy: Strategy | None = None,
        resume: bool = False,
        progress: bool = True,
        nested: bool = False,
    ) -> None:
        check_config(config)
        self.config = with_label_names(config)
        self.run_dir = run_dir
        self.strategy = strategy or build_strategy(config)
        check_clients_match(self.strategy, config)
        self.resume = resume
        self.progress = progress
        self.nested = nested
        """Under an experiment's bar: the round bar goes below it and no table is printed."""
        self.folder = RunFolder(run_dir, self.config)
        self.metrics = self.folder.metrics
        self.nodes = SiteGrid(grid, self.config)
        self.exhausted: set[str] = set()
        """Sites whose DP-SGD budget is spent: never sampled again in this run."""
        self.accountants: dict[str, PrivacyAccountant] = {}
        """What each site reported spending under DP-SGD (checkpointed: a resumed run
        starts with fresh node states, and sites take this over)."""
        self.compression = UplinkCompression(self.config.compression, self.config.seed)
        self.task = build_task(self.config)

    # -- the run -------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Run the remaining rounds; returns the summary also written to summary.json."""
        started = time.monotonic()
        self.folder.prepare(self.resume)
        evaluator = CentralEvaluator(self.config)
        global_state, rng, done = self._start(evaluator)
        layout = update_layout(global_state, evaluator.layout)
        bar = tqdm(
            total=self.config.num_server_rounds,
            initial=done,
            desc=self.run_dir.name if self.nested else "rounds",
            unit="round",
            disable=not self.progress,
            position=int(self.nested),
            leave=not self.nested,
        )
        stopped = None
        for server_round in range(done + 1, self.config.num_server_rounds + 1):
            round_started = time.monotonic()
            try:
                global_state, train_row = self._train_with_retries(
                    server_round, global_state, layout, rng
                )
            except BudgetsSpentError as err:
                stopped = f"{err}; training stopped after round {server_round - 1}"
                log.warning(stopped)
                break
            row = {"round": server_round, **self._evaluate_centrally(evaluator, global_state)}
            row |= train_row
            if self.config.fraction_evaluate > 0:
                available = self.nodes.wait_for_sites()
                row |= self._federated_evaluation(server_round, global_state, available, rng)
            row |= self.nodes.byte_ledger() | {
                "wall-seconds": round(time.monotonic() - round_started, 3),
            }
            self.folder.record(row, global_state, self.strategy, rng, self.accountants)
            bar.set_postfix(round_postfix(row), refresh=False)
            bar.update(1)
            if not self.progress:
                log.info("round %d: %s", server_round, round_postfix(row))
        bar.close()

        summary = self.folder.finish(evaluator, self.strategy, global_state, started, stopped)
        if self.progress and not self.nested:
            print(format_table(self.metrics.rows()), flush=True)
        return summary

    # -- steps -----------------------------------------------------------------------
    def _start(
        self, evaluator: CentralEvaluator
    ) -> tuple[dict[str, torch.Tensor], np.random.Generator, int]:
        """Global state, server RNG and rounds done: restored, or fresh (round 0 recorded)."""
        if self.resume:
            global_state, rng, done, self.accountants = self.folder.restore(self.strategy)
            return global_state, rng, done
        global_state = self.strategy.initial_state(evaluator.initial_state)
        head_row: dict[str, Any] = {}
        if build_head(self.config).initialises:  # strategy.head = "ncm"
            init = HeadInitialisation(self.strategy, self.config, global_state, evaluator.model)
            initialise_over_grid(init, self.nodes)
            global_state, head_row = init.close()
            head_row |= self.nodes.byte_ledger()
        rng = np.random.default_rng(self.config.seed)
        row = {"round": 0, **self._evaluate_centrally(evaluator, global_state), **head_row}
        self.folder.record(row, global_state, self.strategy, rng, self.accountants)
        return global_state, rng, 0

    def _evaluate_centrally(
        self, evaluator: CentralEvaluator, global_state: Mapping[str, torch.Tensor]
    ) -> dict[str, float]:
        if not self.config.central_evaluation:
            return {}
        return self.task.metrics(evaluator(global_state), "test")

    def _train_with_retries(
        self,
        server_round: int,
        global_state: dict[str, torch.Tensor],
        layout: Layout,
        rng: np.random.Generator,
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Train one round. A short round (fewer usable updates than
        ``min-train-replies``) is never averaged: it is retried with a new sample,
        skipped (the global model stays) or stops the run, as ``short-round`` says."""
        cfg = self.config
        attempts = cfg.round_retries + 1 if cfg.short_round == "retry" else 1
        for attempt in range(1, attempts + 1):
            available = {
                nid: site
                for nid, site in self.nodes.wait_for_sites().items()
                if site not in self.exhausted
            }
            BudgetsSpentError.check(self.exhausted, len(available), cfg.min_train_nodes)
            sampled = sample_sites(
                rng, list(available.values()), cfg.fraction_train, cfg.min_train_nodes
            )
            new_state, row = self._train_round(
                server_round, global_state, layout, available, sampled
            )
            if attempt > 1:
                row["round-attempts"] = attempt
            if new_state is not None:
                return new_state, row
            log.warning(
                "round %d: %d usable update(s), %d needed (min-train-replies); attempt %d of %d",
                server_round,
                row["clients-replied"],
                cfg.min_train_replies,
                attempt,
                attempts,
            )
        if cfg.short_round == "stop":
            failures = "; ".join(f"{s}: {r}" for s, r in row["clients-failed"].items())
            raise ShortRoundError(
                f"round {server_round}: {row['clients-replied']} usable update(s), "
                f"{cfg.min_train_replies} needed ({failures}); the run stopped after round "
                f"{server_round - 1} and can be resumed"
            )
        log.warning("round %d skipped: the global model is unchanged", server_round)
        return global_state, row | {"round-skipped": True}

    def _train_round(
        self,
        server_round: int,
        global_state: dict[str, torch.Tensor],
        layout: Layout,
        available: Mapping[int, str],
        sampled: list[str],
    ) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any]]:
        """One attempt at a round: the new global state (``None`` if short) and its row."""
        node_of = {site: nid for nid, site in available.items()}
        train = TrainingRound(
            self.strategy,
            self.config,
            server_round=server_round,
            global_state=global_state,
            layout=layout,
            ranks={site: self.nodes.ranks[site] for site in sampled},
            population=len(available),
            compression=self.compression,
            accountants=self.accountants,
        )
        contents = {node_of[site]: train.content(site) for site in sampled}
        if self.config.privacy.secure_aggregation:
            self._secure_train_round(train, contents, available)
        else:
            messages = [
                Message(
                    content,
                    dst_node_id=node_id,
                    message_type=MessageType.TRAIN,
                    group_id=str(server_round),
                )
                for node_id, content in contents.items()
            ]
            for node_id, reply in self.nodes.exchange(messages, self.nodes.timeout):
                site = available[node_id]
                if reply is None:
                    train.fail(site, "timed out")
                elif reply.has_error():
                    train.fail(site, f"client error: {reply.error.reason}")
                else:
                    train.receive(site, reply.content)
        self.exhausted |= train.exhausted
        return train.close()

    def _secure_train_round(
        self,
        train: TrainingRound,
        contents: Mapping[int, RecordDict],
        site_of: Mapping[int, str],
    ) -> None:
        """Train the sampled sites under SecAgg+: one aggregate update, each site's metrics."""
        site_weight = train.instructions.get(SITE_WEIGHT)
        secagg = SecAggPlus(self.config.privacy, self.nodes.timeout, site_weight)
        try:
            outcome = secagg.run(self.nodes.exchange, contents, train.server_round)
        except SecureAggregationError as err:
            for site in train.sampled:
                train.fail(site, f"secure aggregation failed: {err}")
            return
        for node_id, why in outcome.failed.items():
            if node_id not in outcome.contributors:
                train.fail(site_of[node_id], why)
        replies = {
            site_of[nid]: outcome.replies[nid].content for nid in sorted(outcome.contributors)
        }
        train.receive_sum(outcome.mean, outcome.total_weight, replies)

    def _federated_evaluation(
        self,
        server_round: int,
        global_state: Mapping[str, torch.Tensor],
        available: Mapping[int, str],
        rng: np.random.Generator,
    ) -> dict[str, Any]:
        sites = sample_sites(rng, list(available.values()), self.config.fraction_evaluate, 1)
        node_of = {site: nid for nid, site in available.items()}
        content = RecordDict(global_records(self.strategy, self.config, server_round, global_state))
        messages = [
            Message(
                content,
                dst_node_id=node_of[s],
                message_type=MessageType.EVALUATE,
                group_id=str(server_round),
            )
            for s in sites
        ]

        def replies() -> Iterator[MetricRecord | None]:
            for node_id, reply in self.nodes.exchange(messages, self.nodes.timeout):
                if reply is None or reply.has_error():
                    site = available[node_id]
                    log.warning("round %d: evaluation on %s failed", server_round, site)
                    continue
                yield reply.content.metric_records.get(protocol.METRICS)

        result = federated_result(replies())
        metrics = self.task.metrics(result, "federated")
        return metrics if result.examples else dict.fromkeys(metrics)


def round_postfix(row: Mapping[str, Any]) -> dict[str, str]:
    """What a round's progress bar shows of its metrics row."""
    shown = {
        "test-accuracy": "acc",
        "test-perplexity": "ppl",
        "test-loss": "loss",
        "train-loss": "train",
    }
    return {short: f"{row[key]:.4f}" for key, short in shown.items() if row.get(key) is not None}
