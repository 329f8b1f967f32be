"""The server's round loop: sample sites, send the global state, fold in deltas.

Each round: find the nodes and their site names, sample sites with the server's
seeded RNG, send every sampled node the global trainable state and the run
config, fold each reply into the strategy *as it arrives* (after validating it),
evaluate the new global state centrally and on clients, append a metrics row and
write a checkpoint. A client that fails or sends an invalid update is reported
by site name and left out of the round; it never stops the run.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from tqdm.auto import tqdm

from fedelta import deltas, protocol
from fedelta.build import build_strategy
from fedelta.compatibility import check_config
from fedelta.compression import UplinkCompression
from fedelta.config import RUN_CONFIG_FILE, ConfigError, RunConfig, load_config
from fedelta.data import label_names, load_corpus
from fedelta.errors import InvalidUpdateError, UserError
from fedelta.merging.rounds import RoundStates, merged_export
from fedelta.privacy.accounting import PrivacyAccountant
from fedelta.privacy.secure_aggregation import SecAggPlus, SecureAggregationError
from fedelta.server.checkpoint import FILENAME as CHECKPOINT_FILE
from fedelta.server.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedelta.server.evaluation import CentralEvaluator
from fedelta.server.export import ADAPTER_DIR, export_adapter
from fedelta.server.generations import generate_report, write_generations
from fedelta.server.ledger import message_bytes
from fedelta.server.metrics import MetricsLog, format_table, summarise, write_summary
from fedelta.server.sampling import sample_sites
from fedelta.server.validation import ReplyMetrics, read_metrics, read_update
from fedelta.strategies import EmptyRoundError, Strategy
from fedelta.tasks import EvalResult, build_task
from fedelta.tensors import layout_of

log = logging.getLogger("fedelta")

RESUMABLE_KEYS = frozenset({"num-server-rounds", "output-dir", "resume"})
"""Keys a resumed run may change; any other change would make it a different run."""
REJECTED = "rejected update"
"""How ``clients-failed`` words an update the server's validation refused."""
POLL_SECONDS = 0.1
DISCOVERY_TIMEOUT = 120.0


class BudgetsSpentError(EmptyRoundError):
    """Too few sites have privacy budget left to train a round: the run ends early
    (and exports what it has)."""


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
        self.grid = grid
        check_config(config)
        self.config = _with_label_names(config)
        self.run_dir = run_dir
        self.strategy = strategy or build_strategy(config)
        _check_clients_match(self.strategy, config)
        self.resume = resume
        self.progress = progress
        self.nested = nested
        """Under an experiment's bar: the round bar goes below it and no table is printed."""
        self.metrics = MetricsLog(run_dir)
        self.sites: dict[int, str] = {}
        """Node id to site name, learned by querying each node once."""
        self.ranks: dict[str, int] = {}
        """Site name to the LoRA rank it trains."""
        self.refused: set[int] = set()
        """Nodes whose site config this run cannot use (reported once)."""
        self.exhausted: set[str] = set()
        """Sites whose DP-SGD budget is spent: never sampled again in this run."""
        self.dp_ledger: dict[str, PrivacyAccountant] = {}
        """What each site reported spending under DP-SGD (checkpointed: a resumed run
        starts with fresh node states, and sites take this over)."""
        self.compression = UplinkCompression(self.config.compression, self.config.seed)
        self.task = build_task(self.config)
        self.round_states = RoundStates(run_dir)
        self._down: dict[int, int] = {}
        self._up: dict[int, int] = {}
        """Serialized bytes sent to and received from each node this round."""

    # -- the run -------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Run the remaining rounds; returns the summary also written to summary.json."""
        started = time.monotonic()
        self._prepare_run_dir()
        evaluator = CentralEvaluator(self.config)
        global_state, rng, done = self._start(evaluator)
        layout = {k: v for k, v in layout_of(global_state).items() if k in evaluator.layout}
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
            self._down, self._up = {}, {}
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
                available = self._wait_for_sites()
                row |= self._federated_evaluation(server_round, global_state, available, rng)
            row |= self._byte_ledger() | {
                "wall-seconds": round(time.monotonic() - round_started, 3),
            }
            self._complete_round(row, global_state, rng)
            bar.set_postfix(_postfix(row), refresh=False)
            bar.update(1)
            if not self.progress:
                log.info("round %d: %s", server_round, _postfix(row))
        bar.close()

        exported = self._exported_state(evaluator, global_state)
        export_adapter(
            evaluator.model,
            exported,
            evaluator.label_names,
            self.config.model.name,
            self.run_dir / ADAPTER_DIR,
            task=self.config.model.task,
        )
        rows = self.metrics.rows()
        summary = summarise(rows, time.monotonic() - started)
        summary["adapter"] = str(self.run_dir / ADAPTER_DIR)
        summary["strategy"] = getattr(self.strategy, "name", type(self.strategy).__name__)
        if stopped:
            summary["stopped-early"] = stopped
        if exported is not global_state:
            summary["export-merge"] = self.config.export.merge
            if self.config.central_evaluation:
                summary |= {
                    f"exported-{k}": v
                    for k, v in self.task.metrics(evaluator(exported), "test").items()
                }
        generation = self.config.generation
        if self.config.model.task == "causal-lm" and (
            generation.num_prompts or generation.prompt_list()
        ):
            test = load_corpus(self.config.data, self.config.seed).test
            summary["generations"] = generate_report(evaluator, generation, test, exported)
            write_generations(self.run_dir, summary["generations"])
        write_summary(self.run_dir, summary)
        if self.progress and not self.nested:
            print(format_table(rows), flush=True)
        return summary

    # -- steps -----------------------------------------------------------------------
    def _prepare_run_dir(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        saved = self.run_dir / RUN_CONFIG_FILE
        if self.resume:
            if changed := config_changes(self.run_dir, self.config):
                raise ConfigError(
                    f"cannot resume '{self.run_dir}' with a different config: "
                    f"{', '.join(changed)} changed (only num-server-rounds may)"
                )
        elif (self.run_dir / CHECKPOINT_FILE).exists():
            raise ConfigError(
                f"'{self.run_dir}' already holds a run; resume it or choose another output dir"
            )
        saved.write_text(self.config.to_toml(), encoding="utf-8")

    def _start(
        self, evaluator: CentralEvaluator
    ) -> tuple[dict[str, torch.Tensor], np.random.Generator, int]:
        """Global state, server RNG and rounds done: restored, or fresh (round 0 recorded)."""
        if self.resume:
            checkpoint = load_checkpoint(self.run_dir)
            self.strategy.load_state_dict(checkpoint.strategy_tensors, checkpoint.strategy_meta)
            self.dp_ledger = {
                site: PrivacyAccountant.from_meta(meta) for site, meta in checkpoint.privacy.items()
            }
            rng = np.random.default_rng()
            rng.bit_generator.state = checkpoint.rng_state
            self.metrics.truncate_after(checkpoint.server_round)
            log.info("resuming after round %d from %s", checkpoint.server_round, self.run_dir)
            return checkpoint.global_state, rng, checkpoint.server_round
        global_state = self.strategy.initial_state(evaluator.initial_state)
        rng = np.random.default_rng(self.config.seed)
        row = {"round": 0, **self._evaluate_centrally(evaluator, global_state)}
        self._complete_round(row, global_state, rng)
        return global_state, rng, 0

    def _exported_state(
        self, evaluator: CentralEvaluator, global_state: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The last global model, or the merge across rounds ``export.merge`` asks for."""
        if self.config.export.merge == "none":
            return global_state
        return merged_export(
            self.config.export,
            self.run_dir,
            self.config.num_server_rounds,
            evaluator.model,
            self.config.seed,
        )

    def _evaluate_centrally(
        self, evaluator: CentralEvaluator, global_state: Mapping[str, torch.Tensor]
    ) -> dict[str, float]:
        if not self.config.central_evaluation:
            return {}
        return self.task.metrics(evaluator(global_state), "test")

    def _complete_round(
        self,
        row: dict[str, Any],
        global_state: Mapping[str, torch.Tensor],
        rng: np.random.Generator,
    ) -> None:
        """Record the round, then checkpoint it; a crash between the two is undone on resume."""
        self.metrics.append(row)
        if self.config.export.merge != "none":
            self.round_states.record(row["round"], global_state)
        tensors, meta = self.strategy.state_dict()
        state = dict(global_state)
        privacy = {site: ledger.to_meta() for site, ledger in self.dp_ledger.items()}
        save_checkpoint(
            self.run_dir,
            Checkpoint(row["round"], state, tensors, meta, rng.bit_generator.state, privacy),
        )

    def _wait_for_sites(self) -> dict[int, str]:
        """Block until enough nodes are connected; learn the site name of new ones."""
        waited_since = time.monotonic()
        while True:
            node_ids = set(self.grid.get_node_ids())
            self.sites = {nid: site for nid, site in self.sites.items() if nid in node_ids}
            unknown = sorted(node_ids - self.sites.keys() - self.refused)
            if unknown:
                self._query_sites(unknown)
            needed = max(self.config.min_available_nodes, self.config.min_train_nodes)
            if len(self.sites) >= needed:
                return dict(self.sites)
            if time.monotonic() - waited_since > 30:
                log.info("waiting for nodes: %d of %d connected", len(self.sites), needed)
                waited_since = time.monotonic()
            time.sleep(1.0)

    def _query_sites(self, node_ids: list[int]) -> None:
        messages = [
            Message(RecordDict(), dst_node_id=nid, message_type=MessageType.QUERY)
            for nid in node_ids
        ]
        for node_id, reply in self._exchange(messages, DISCOVERY_TIMEOUT):
            if (
                reply is None
                or reply.has_error()
                or protocol.SITE not in reply.content.config_records
            ):
                why = reply.error.reason if reply is not None and reply.has_error() else "no answer"
                log.warning("node %d did not identify itself: %s", node_id, why)
                continue
            site = protocol.Site.from_record(reply.content.config_records[protocol.SITE])
            try:
                rank = site.rank(self.config)
            except protocol.NodeConfigError as err:
                log.warning("node %d left out of this run: %s", node_id, err)
                self.refused.add(node_id)
                continue
            name = site.name
            if name in self.sites.values():
                log.warning(
                    "two nodes report site %r; calling node %d %r",
                    name,
                    node_id,
                    f"{name}#{node_id}",
                )
                name = f"{name}#{node_id}"
            self.sites[node_id] = name
            self.ranks[name] = rank

    def _train_with_retries(
        self,
        server_round: int,
        global_state: dict[str, torch.Tensor],
        layout: Mapping[str, tuple[int, ...]],
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
                for nid, site in self._wait_for_sites().items()
                if site not in self.exhausted
            }
            if len(available) < cfg.min_train_nodes:
                raise BudgetsSpentError(
                    f"the privacy budgets of {', '.join(sorted(self.exhausted))} are spent: "
                    f"{len(available)} site(s) can still train, min-train-nodes is "
                    f"{cfg.min_train_nodes}"
                )
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
        layout: Mapping[str, tuple[int, ...]],
        available: Mapping[int, str],
        sampled: list[str],
    ) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any]]:
        """One attempt at a round: the new global state (``None`` if short) and its row."""
        node_of = {site: nid for nid, site in available.items()}
        self.strategy.begin_round(
            server_round,
            global_state,
            [self.ranks[s] for s in sampled],
            population=len(available),
        )
        records = self._global_records(server_round, global_state)
        if strategy_config := self.strategy.client_config(server_round):
            records[protocol.STRATEGY] = ConfigRecord(strategy_config)
        replies = _RoundReplies()
        contents = {site: self._train_content(site, records) for site in sampled}
        if self.config.privacy.secure_aggregation:
            self._secure_train_round(server_round, contents, node_of, layout, replies)
        else:
            messages = [
                Message(
                    content,
                    dst_node_id=node_of[site],
                    message_type=MessageType.TRAIN,
                    group_id=str(server_round),
                )
                for site, content in contents.items()
            ]
            for node_id, reply in self._exchange(messages, self._timeout()):
                site = available[node_id]
                if self._refused(site, reply, replies):
                    continue
                assert reply is not None
                rank = self.ranks[site]
                uplink = self.strategy.uplink_layout(layout, rank)
                try:
                    update = read_update(
                        reply.content,
                        uplink,
                        self.compression,
                        server_round,
                        self.config.max_update_norm,
                    )
                except InvalidUpdateError as err:
                    replies.fail(site, f"{REJECTED}: {err}")
                    replies.rejected += 1
                    continue
                self.strategy.accumulate(update.delta, self._weight(update.metrics), rank)
                self._count(replies, site, update.metrics, _dense_bytes(uplink))
        for site, why in replies.failed.items():
            log.warning("round %d: %s left out: %s", server_round, site, why)
        row = replies.row(sampled)
        if len(replies.replied) < self.config.min_train_replies:
            return None, row
        new_state = self.strategy.finish_round(global_state)
        return new_state, self.strategy.round_metrics() | row

    def _train_content(self, site: str, records: Mapping[str, Any]) -> RecordDict:
        """A site's training message: the round's records, plus under DP-SGD what the
        site has spent so far by the server's ledger."""
        content = RecordDict(dict(records))
        if site in self.dp_ledger:
            content[protocol.DP_SPENT] = self.dp_ledger[site].to_record()
        return content

    def _count(
        self, replies: _RoundReplies, site: str, metrics: ReplyMetrics, dense_bytes: int
    ) -> None:
        """Record a usable reply, and what DP-SGD spent for it in the site's ledger."""
        replies.count(site, metrics, dense_bytes)
        if metrics.mechanism is not None:
            self.dp_ledger.setdefault(site, PrivacyAccountant()).spend(*metrics.mechanism)

    def _weight(self, metrics: ReplyMetrics) -> float:
        """A reply's weight in the mean: its examples, or 1 under client-level DP
        (equal weights bound one site's influence)."""
        return 1.0 if self.config.privacy.client_dp != "none" else float(metrics.num_examples)

    def _refused(self, site: str, reply: Message | None, replies: _RoundReplies) -> bool:
        """Whether ``reply`` brings no update (timeout, error, spent privacy budget); if
        so it is recorded. A site whose budget is spent is not sampled again."""
        if reply is None:
            replies.fail(site, "timed out")
        elif reply.has_error():
            replies.fail(site, f"client error: {reply.error.reason}")
            if protocol.BUDGET_SPENT in reply.error.reason:
                self.exhausted.add(site)
        elif protocol.REFUSED in reply.content.config_records:
            reason = str(reply.content.config_records[protocol.REFUSED].get("reason", ""))
            replies.fail(site, f"refused: {reason}")
            if protocol.BUDGET_SPENT in reason:
                self.exhausted.add(site)
            metrics = reply.content.metric_records.get(protocol.METRICS)
            if metrics is not None and protocol.DP_EPSILON in metrics:
                replies.epsilon[site] = float(metrics[protocol.DP_EPSILON])
        else:
            return False
        return True

    def _secure_train_round(
        self,
        server_round: int,
        contents: Mapping[str, RecordDict],
        node_of: Mapping[str, int],
        layout: Mapping[str, tuple[int, ...]],
        replies: _RoundReplies,
    ) -> None:
        """Train the sampled sites under SecAgg+: one aggregate update, each site's metrics."""
        site_of = {nid: site for site, nid in node_of.items()}
        sampled = list(contents)
        try:
            outcome = SecAggPlus(self.config.privacy, self._timeout()).run(
                self._exchange, {node_of[site]: c for site, c in contents.items()}, server_round
            )
        except SecureAggregationError as err:
            for site in sampled:
                replies.fail(site, f"secure aggregation failed: {err}")
            return
        for node_id, why in outcome.failed.items():
            if node_id not in outcome.contributors:
                replies.fail(site_of[node_id], why)
                if protocol.BUDGET_SPENT in why:
                    self.exhausted.add(site_of[node_id])
        rank = self.ranks[sampled[0]]
        uplink = self.strategy.uplink_layout(layout, rank)
        counted = []
        for node_id in sorted(outcome.contributors):
            try:
                metrics = read_metrics(outcome.replies[node_id].content)
            except InvalidUpdateError as err:
                # Its upload is already in the sum: the round cannot leave it out.
                log.warning(
                    "round %d: %s sent invalid metrics: %s", server_round, site_of[node_id], err
                )
                continue
            counted.append((site_of[node_id], metrics))
        if outcome.mean is None:
            return
        try:
            mean = self.compression.decode(outcome.mean, uplink, server_round)
        except InvalidUpdateError as err:
            for site, _ in counted:
                replies.fail(site, f"{REJECTED} (the secure sum): {err}")
            replies.rejected += len(counted)
            return
        self.strategy.accumulate(mean, outcome.total_weight, rank)
        for site, metrics in counted:
            self._count(replies, site, metrics, _dense_bytes(uplink))

    def _federated_evaluation(
        self,
        server_round: int,
        global_state: Mapping[str, torch.Tensor],
        available: Mapping[int, str],
        rng: np.random.Generator,
    ) -> dict[str, Any]:
        sites = sample_sites(rng, list(available.values()), self.config.fraction_evaluate, 1)
        node_of = {site: nid for nid, site in available.items()}
        content = RecordDict(self._global_records(server_round, global_state))
        messages = [
            Message(
                content,
                dst_node_id=node_of[s],
                message_type=MessageType.EVALUATE,
                group_id=str(server_round),
            )
            for s in sites
        ]
        loss_sum = correct = count = 0
        for node_id, reply in self._exchange(messages, self._timeout()):
            if reply is None or reply.has_error():
                log.warning("round %d: evaluation on %s failed", server_round, available[node_id])
                continue
            metrics = reply.content.metric_records.get(protocol.METRICS)
            n = metrics.get(protocol.NUM_EXAMPLES, 0) if metrics else 0
            if not n or not all(
                math.isfinite(metrics.get(k, math.nan)) for k in ("eval-loss", "eval-accuracy")
            ):
                continue
            loss_sum += metrics["eval-loss"] * n
            correct += metrics["eval-accuracy"] * n
            count += n
        if count == 0:
            nothing = EvalResult(loss=math.nan, accuracy=math.nan, examples=0)
            return dict.fromkeys(self.task.metrics(nothing, "federated"))
        result = EvalResult(loss=loss_sum / count, accuracy=correct / count, examples=count)
        return self.task.metrics(result, "federated")

    # -- messaging ---------------------------------------------------------------------
    def _global_records(
        self, server_round: int, global_state: Mapping[str, torch.Tensor]
    ) -> dict[str, Any]:
        """The global model as the strategy sends it, and the run config."""
        adapter, fold = self.strategy.downlink(global_state)
        records: dict[str, Any] = {
            protocol.GLOBAL: deltas.encode(adapter),
            protocol.CONFIG: protocol.config_record(self.config, server_round),
        }
        if fold:
            records[protocol.FOLD] = deltas.encode(fold)
        return records

    def _byte_ledger(self) -> dict[str, Any]:
        """This round's bytes down and up, in total and per site."""

        def by_site(counts: Mapping[int, int]) -> dict[str, int]:
            return {self.sites.get(n, f"node-{n}"): b for n, b in sorted(counts.items())}

        return {
            "bytes-down": sum(self._down.values()),
            "bytes-up": sum(self._up.values()),
            "bytes-down-by-site": by_site(self._down),
            "bytes-up-by-site": by_site(self._up),
        }

    def _timeout(self) -> float | None:
        return self.config.round_timeout or None

    def _exchange(
        self, messages: list[Message], timeout: float | None
    ) -> Iterator[tuple[int, Message | None]]:
        """Send ``messages``; yield ``(node, reply)`` as replies land.

        Messages still unanswered at the timeout yield ``(node, None)``.
        """
        for m in messages:
            node = m.metadata.dst_node_id
            self._down[node] = self._down.get(node, 0) + message_bytes(m)
        ids = list(self.grid.push_messages(messages))
        destination = {mid: m.metadata.dst_node_id for mid, m in zip(ids, messages, strict=True)}
        pending = set(ids)
        deadline = None if timeout is None else time.monotonic() + timeout
        while pending:
            for reply in self.grid.pull_messages(pending):
                message_id = reply.metadata.reply_to_message_id
                if message_id not in pending:
                    continue
                pending.discard(message_id)
                node = destination[message_id]
                self._up[node] = self._up.get(node, 0) + message_bytes(reply)
                yield destination[message_id], reply
            if pending:
                if deadline is not None and time.monotonic() > deadline:
                    break
                time.sleep(POLL_SECONDS)
        for message_id in pending:
            yield destination[message_id], None


class _RoundReplies:
    """What one round's training replies amounted to, for its metrics row."""

    def __init__(self) -> None:
        self.failed: dict[str, str] = {}
        self.replied: list[str] = []
        self.epsilon: dict[str, float] = {}
        self.rejected = 0
        self.dense_fp32 = 0
        self._loss_sum = 0.0
        self._examples = 0

    def fail(self, site: str, why: str) -> None:
        self.failed[site] = why

    def count(self, site: str, metrics: ReplyMetrics, dense_bytes: int) -> None:
        self.replied.append(site)
        self._loss_sum += metrics.train_loss * metrics.num_examples
        self._examples += metrics.num_examples
        self.dense_fp32 += dense_bytes
        if metrics.epsilon is not None:
            self.epsilon[site] = metrics.epsilon

    def row(self, sampled: list[str]) -> dict[str, Any]:
        row: dict[str, Any] = {
            "train-loss": self._loss_sum / self._examples if self._examples else None,
            "clients-sampled": len(sampled),
            "clients-replied": len(self.replied),
            "clients-rejected": self.rejected,
            "dense-fp32-bytes-up": self.dense_fp32,
            "sites-sampled": sampled,
            "clients-failed": self.failed,
        }
        if self.epsilon:
            row["dp-epsilon"] = max(self.epsilon.values())
            row["dp-epsilon-by-site"] = dict(sorted(self.epsilon.items()))
        return row


def _dense_bytes(layout: Mapping[str, tuple[int, ...]]) -> int:
    """What an upload of ``layout`` would be as dense fp32."""
    return 4 * sum(math.prod(shape) for shape in layout.values())


def config_changes(run_dir: Path, config: RunConfig) -> list[str]:
    """Keys whose value in ``config`` differs from the run saved in ``run_dir`` (label
    names filled in as the run saved them), except those a resumed run may change."""
    previous = load_config(run_dir / RUN_CONFIG_FILE).to_flat()
    current = _with_label_names(config).to_flat()
    return sorted(
        key
        for key, value in current.items()
        if previous.get(key) != value and key not in RESUMABLE_KEYS
    )


def _with_label_names(config: RunConfig) -> RunConfig:
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


def _check_clients_match(strategy: Strategy, config: RunConfig) -> None:
    """Clients follow the config's LoRA rule (what they freeze, keep and send); a
    strategy object with another rule would reject every reply, so refuse it now."""
    rule = getattr(getattr(strategy, "lora", None), "name", config.strategy.lora)
    if rule != config.strategy.lora:
        raise ConfigError(
            f"the strategy aggregates LoRA with {rule!r} but clients follow the config's "
            f"strategy.lora = {config.strategy.lora!r}; set strategy.lora = {rule!r}"
        )


def _postfix(row: Mapping[str, Any]) -> dict[str, str]:
    shown = {
        "test-accuracy": "acc",
        "test-perplexity": "ppl",
        "test-loss": "loss",
        "train-loss": "train",
    }
    return {short: f"{row[key]:.4f}" for key, short in shown.items() if row.get(key) is not None}
