"""One training round of a strategy, whatever carries its messages.

A driver (:class:`~fedelta.server.federation.Federation` over a Flower ``Grid``,
:func:`~fedelta.simulations.federate` in one process) opens a
:class:`TrainingRound` for the sampled sites, sends each the content it asks for,
hands it every reply's content or the reason none came, and closes it. What
happens in between is the same for both: a refusal is recorded, every update is
validated (:func:`~fedelta.server.validation.read_update`, ``max-update-norm``
included), weighted as the strategy says and folded into it as it arrives, and the
round counts what its metrics row reports. Under SecAgg+ the round takes one
summed update and each contributor's metrics instead.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedelta import deltas, protocol
from fedelta.compression import UplinkCompression
from fedelta.config import RunConfig
from fedelta.errors import InvalidUpdateError
from fedelta.privacy.accounting import PrivacyAccountant
from fedelta.server.drift import DriftMonitor
from fedelta.server.validation import ReplyMetrics, read_metrics, read_update
from fedelta.strategies import Strategy
from fedelta.strategies.heads import round_phase, select_layout
from fedelta.tensors import Layout, TensorDict, layout_of

log = logging.getLogger("fedelta")

REJECTED = "rejected update"
"""How ``clients-failed`` words an update the server's validation refused."""


def update_layout(global_state: Mapping[str, torch.Tensor], adapter: Layout) -> Layout:
    """Names and shapes of the global state's adapter tensors (not its folds): what a
    full-rank update covers."""
    return {k: v for k, v in layout_of(global_state).items() if k in adapter}


def global_records(
    strategy: Strategy,
    config: RunConfig,
    server_round: int,
    global_state: Mapping[str, torch.Tensor],
) -> dict[str, Any]:
    """The global model as the strategy sends it, and the run config."""
    adapter, fold = strategy.downlink(global_state)
    records: dict[str, Any] = {
        protocol.GLOBAL: deltas.encode(adapter),
        protocol.CONFIG: protocol.config_record(config, server_round),
    }
    if fold:
        records[protocol.FOLD] = deltas.encode(fold)
    return records


class TrainingRound:
    """One attempt at a round over ``ranks`` (the sampled sites and their LoRA ranks),
    from opening the strategy's round to its new global state.

    ``accountants`` is the server's record of what each site spent under DP-SGD: sites are
    told it, and the round adds what their replies report. Sites whose privacy budget
    is spent end up in :attr:`exhausted`."""

    def __init__(
        self,
        strategy: Strategy,
        config: RunConfig,
        *,
        server_round: int,
        global_state: TensorDict,
        layout: Layout,
        ranks: Mapping[str, int],
        population: int,
        compression: UplinkCompression,
        accountants: dict[str, PrivacyAccountant],
    ) -> None:
        self.strategy, self.config, self.server_round = strategy, config, server_round
        self.global_state, self.layout, self.ranks = global_state, layout, dict(ranks)
        self.compression, self.accountants = compression, accountants
        strategy.begin_round(
            server_round, global_state, list(ranks.values()), population=population
        )
        self.records = global_records(strategy, config, server_round, global_state)
        self.phase = round_phase(config, server_round)
        """Which tensors train and are sent this round (``strategy.head``)."""
        self.instructions = strategy.client_config(server_round)
        """What the strategy asks of the sites this round."""
        if self.instructions:
            self.records[protocol.STRATEGY] = ConfigRecord(self.instructions)
        self.failed: dict[str, str] = {}
        self.replied: list[str] = []
        self.epsilon: dict[str, float] = {}
        self.exhausted: set[str] = set()
        self.rejected = 0
        self.dense_fp32 = 0
        self._loss_sum = 0.0
        self._examples = 0
        self.drift = DriftMonitor()
        """Each site's update, for the round's drift metrics (:mod:`fedelta.server.drift`)."""

    @property
    def sampled(self) -> list[str]:
        """The sites sampled for this round, in sampling order."""
        return list(self.ranks)

    def content(self, site: str) -> RecordDict:
        """A site's training message: the round's records, what the strategy sends this
        site alone (SCAFFOLD's control variates), and under DP-SGD what the site has
        spent so far by the server's accountants."""
        content = RecordDict(dict(self.records))
        extras, instructions = self.strategy.site_downlink(site)
        for name, tensors in extras.items():
            content[name] = deltas.encode(tensors)
        if instructions:
            content[protocol.STRATEGY] = ConfigRecord(self.instructions | instructions)
        if site in self.accountants:
            content[protocol.DP_SPENT] = self.accountants[site].to_record()
        return content

    # -- replies -------------------------------------------------------------------------
    def fail(self, site: str, why: str) -> None:
        """``site`` brought no update; one whose privacy budget is spent is exhausted."""
        self.failed[site] = why
        if protocol.BUDGET_SPENT in why:
            self.exhausted.add(site)

    def receive(self, site: str, content: RecordDict) -> None:
        """Take a site's reply: a refusal, an update the validation rejects, or an
        update folded into the strategy with the weight it gives the reply."""
        if protocol.REFUSED in content.config_records:
            reason = str(content.config_records[protocol.REFUSED].get("reason", ""))
            self.fail(site, f"refused: {reason}")
            metrics = content.metric_records.get(protocol.METRICS)
            if metrics is not None and protocol.DP_EPSILON in metrics:
                self.epsilon[site] = float(metrics[protocol.DP_EPSILON])
            return
        rank = self.ranks[site]
        uplink = select_layout(self.phase, self.strategy.uplink_layout(self.layout, rank))
        extra_layouts = self.strategy.reply_layouts(uplink)
        try:
            update = read_update(
                content, uplink, self.compression, self.server_round, self.config.max_update_norm
            )
            extras = _read_extras(content, extra_layouts)
            weight = self.strategy.reply_weight(update.metrics.num_examples)
            self.strategy.observe_reply(site, update.metrics.steps, extras)
            self.strategy.accumulate(update.delta, weight, rank)
        except InvalidUpdateError as err:
            self.fail(site, f"{REJECTED}: {err}")
            self.rejected += 1
            return
        self.drift.observe(site, update.delta)
        dense = _dense_bytes(uplink) + sum(_dense_bytes(lay) for lay in extra_layouts.values())
        self._count(site, update.metrics, dense)

    def receive_sum(
        self, mean: ArrayRecord | None, total_weight: float, replies: Mapping[str, RecordDict]
    ) -> None:
        """SecAgg+: the weighted mean of the contributors' uploads (``None`` if the
        protocol recovered none) and each contributor's reply, whose metrics count."""
        counted = []
        for site, content in replies.items():
            try:
                counted.append((site, read_metrics(content)))
            except InvalidUpdateError as err:
                # Its upload is already in the sum: the round cannot leave it out.
                log.warning("round %d: %s sent invalid metrics: %s", self.server_round, site, err)
        if mean is None:
            return
        rank = self.ranks[self.sampled[0]]
        uplink = select_layout(self.phase, self.strategy.uplink_layout(self.layout, rank))
        try:
            decoded = self.compression.decode(mean, uplink, self.server_round)
        except InvalidUpdateError as err:
            for site, _ in counted:
                self.fail(site, f"{REJECTED} (the secure sum): {err}")
            self.rejected += len(counted)
            return
        self.strategy.accumulate(decoded, total_weight, rank)
        for site, metrics in counted:
            self._count(site, metrics, _dense_bytes(uplink))

    def _count(self, site: str, metrics: ReplyMetrics, dense_bytes: int) -> None:
        """Record a usable reply, and what DP-SGD spent for it in the site's accountant."""
        self.replied.append(site)
        self._loss_sum += metrics.train_loss * metrics.num_examples
        self._examples += metrics.num_examples
        self.dense_fp32 += dense_bytes
        if metrics.epsilon is not None:
            self.epsilon[site] = metrics.epsilon
        if metrics.mechanism is not None:
            self.accountants.setdefault(site, PrivacyAccountant()).spend(*metrics.mechanism)

    # -- the end -------------------------------------------------------------------------
    def close(self) -> tuple[TensorDict | None, dict[str, Any]]:
        """The new global state (``None`` for a short round: fewer usable updates than
        ``min-train-replies``, never averaged) and the round's metrics row."""
        for site, why in self.failed.items():
            log.warning("round %d: %s left out: %s", self.server_round, site, why)
        row: dict[str, Any] = {
            "train-loss": self._loss_sum / self._examples if self._examples else None,
            "clients-sampled": len(self.ranks),
            "clients-replied": len(self.replied),
            "clients-rejected": self.rejected,
            "dense-fp32-bytes-up": self.dense_fp32,
            "sites-sampled": self.sampled,
            "clients-failed": self.failed,
        }
        if self.epsilon:
            row["dp-epsilon"] = max(self.epsilon.values())
            row["dp-epsilon-by-site"] = dict(sorted(self.epsilon.items()))
        if len(self.replied) < self.config.min_train_replies:
            return None, row
        new_state = self.strategy.finish_round(self.global_state)
        drift = self.drift.close(self.global_state, new_state)
        return new_state, self.strategy.round_metrics() | row | drift


def _read_extras(content: RecordDict, layouts: Mapping[str, Layout]) -> dict[str, TensorDict]:
    """The extra records a strategy expects in a reply, each decoded against its layout
    (dense fp32, finite)."""
    extras = {}
    for name, layout in layouts.items():
        record = content.array_records.get(name)
        if record is None:
            raise InvalidUpdateError(f"reply has no '{name}' record")
        try:
            extras[name] = deltas.decode(record, layout)
        except InvalidUpdateError as err:
            raise InvalidUpdateError(f"'{name}': {err}") from None
    return extras


def _dense_bytes(layout: Layout) -> int:
    """What an upload of ``layout`` would be as dense fp32."""
    return 4 * sum(math.prod(shape) for shape in layout.values())
