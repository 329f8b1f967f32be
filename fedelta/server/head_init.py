"""The head's initialisation round before round 1 (``strategy.head = "ncm"``),
whatever carries its messages.

A driver opens a :class:`HeadInitialisation` over the initial global state, sends
each site its content (the global model as the strategy sends it, and the run
config), hands it each reply or the reason none came, and closes it: the global
state with the head set to the nearest-class-mean classifier, and the entries of
round 0's metrics row. :func:`initialise_over_grid` is the Flower driver (one
``query.head_statistics`` message per available site); the in-process engine calls
:meth:`~fedelta.client.session.ClientSession.head_statistics` directly. The method
itself is in :mod:`fedelta.strategies.heads.ncm`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from flwr.app import Message, RecordDict

from fedelta import deltas, protocol
from fedelta.config import RunConfig
from fedelta.errors import InvalidUpdateError, UserError
from fedelta.server.round import global_records
from fedelta.server.site_grid import SiteGrid
from fedelta.strategies import Strategy
from fedelta.strategies.heads import ClassStatistics, head_linear, with_ncm_head
from fedelta.strategies.heads.ncm import COUNTS, SUMS
from fedelta.tensors import TensorDict

log = logging.getLogger("fedelta")


class HeadInitialisationError(UserError, RuntimeError):
    """Fewer sites than ``min-train-replies`` sent usable head statistics."""


class HeadInitialisation:
    """Collects the sites' class statistics and sets the head of ``global_state``.

    ``model`` is a model of the run's architecture (the server's evaluation model):
    it names the head layer and its shape, which every reply must match."""

    def __init__(
        self,
        strategy: Strategy,
        config: RunConfig,
        global_state: TensorDict,
        model: torch.nn.Module,
    ) -> None:
        self.config, self.global_state = config, global_state
        self.module, linear = head_linear(model)
        self.layout = {
            SUMS: (linear.out_features, linear.in_features),
            COUNTS: (linear.out_features,),
        }
        self.records = global_records(strategy, config, 0, global_state)
        self.total = ClassStatistics.zeros(linear.out_features, linear.in_features)
        self.replied: list[str] = []
        self.failed: dict[str, str] = {}

    def content(self) -> RecordDict:
        return RecordDict(dict(self.records))

    def fail(self, site: str, why: str) -> None:
        self.failed[site] = why

    def receive(self, site: str, content: RecordDict) -> None:
        """Add a site's statistics, or leave the site out naming why they are unusable."""
        record = content.array_records.get(protocol.HEAD_STATISTICS)
        if record is None:
            self.fail(site, f"no '{protocol.HEAD_STATISTICS}' record in the reply")
            return
        try:
            stats = ClassStatistics.from_tensors(deltas.decode(record, self.layout))
        except (InvalidUpdateError, ValueError) as err:
            self.fail(site, f"rejected head statistics: {err}")
            return
        self.total.add(stats)
        self.replied.append(site)

    def close(self) -> tuple[TensorDict, dict[str, Any]]:
        """The global state with the NCM head, and round 0's ``head-init-*`` entries."""
        for site, why in self.failed.items():
            log.warning("head initialisation: %s left out: %s", site, why)
        if len(self.replied) < self.config.min_train_replies:
            raise HeadInitialisationError(
                f'strategy.head = "ncm": {len(self.replied)} site(s) sent usable head '
                f"statistics, min-train-replies is {self.config.min_train_replies} "
                f"({'; '.join(f'{s}: {w}' for s, w in self.failed.items()) or 'no site'})"
            )
        state = with_ncm_head(self.global_state, self.total, self.module)
        row = {
            "head-init-sites": sorted(self.replied),
            "head-init-failed": self.failed,
            "head-init-examples": int(self.total.counts.sum()),
        }
        return state, row


def initialise_over_grid(init: HeadInitialisation, nodes: SiteGrid) -> None:
    """Ask every available site of ``nodes`` for its statistics and hand ``init`` the
    replies (a site that times out or fails is left out, named)."""
    available = nodes.wait_for_sites()
    messages = [
        Message(
            init.content(),
            dst_node_id=node_id,
            message_type=protocol.HEAD_STATISTICS_MESSAGE,
            group_id="0",
        )
        for node_id in available
    ]
    for node_id, reply in nodes.exchange(messages, nodes.timeout):
        site = available[node_id]
        if reply is None:
            init.fail(site, "timed out")
        elif reply.has_error():
            init.fail(site, f"client error: {reply.error.reason}")
        else:
            init.receive(site, reply.content)
