"""A Flower ``Grid`` seen by site: who the nodes are, messages out, replies back, bytes.

Flower node ids are random per run; the server samples and reports by the site
name each node gives when first queried. Every message sent and every reply
received is counted at its exact serialized size, per node, for the round's byte
ledger (:mod:`fedelta.server.ledger`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from typing import Any

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedelta import protocol
from fedelta.config import RunConfig
from fedelta.server.ledger import serialized_bytes

log = logging.getLogger("fedelta")

POLL_SECONDS = 0.1
DISCOVERY_TIMEOUT = 120.0


class SiteGrid:
    """The nodes of a ``Grid`` by site name and LoRA rank, with a per-node byte count."""

    def __init__(self, grid: Grid, config: RunConfig) -> None:
        self.grid = grid
        self.config = config
        self.sites: dict[int, str] = {}
        """Node id to site name, learned by querying each node once."""
        self.ranks: dict[str, int] = {}
        """Site name to the LoRA rank it trains."""
        self.refused: set[int] = set()
        """Nodes whose site config this run cannot use (reported once)."""
        self.down: dict[int, int] = {}
        self.up: dict[int, int] = {}
        """Serialized bytes sent to and received from each node this round."""

    @property
    def timeout(self) -> float | None:
        """How long a round waits for replies (``round-timeout``; ``None``: for ever)."""
        return self.config.round_timeout or None

    def wait_for_sites(self) -> dict[int, str]:
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
        for node_id, reply in self.exchange(messages, DISCOVERY_TIMEOUT):
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

    def exchange(
        self, messages: list[Message], timeout: float | None
    ) -> Iterator[tuple[int, Message | None]]:
        """Send ``messages``; yield ``(node, reply)`` as replies land.

        Messages still unanswered at the timeout yield ``(node, None)``.
        """
        for m in messages:
            node = m.metadata.dst_node_id
            self.down[node] = self.down.get(node, 0) + serialized_bytes(m)
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
                self.up[node] = self.up.get(node, 0) + serialized_bytes(reply)
                yield destination[message_id], reply
            if pending:
                if deadline is not None and time.monotonic() > deadline:
                    break
                time.sleep(POLL_SECONDS)
        for message_id in pending:
            yield destination[message_id], None

    def byte_ledger(self) -> dict[str, Any]:
        """This round's bytes down and up, in total and per site; the count restarts."""

        def by_site(counts: Mapping[int, int]) -> dict[str, int]:
            return {self.sites.get(n, f"node-{n}"): b for n, b in sorted(counts.items())}

        ledger = {
            "bytes-down": sum(self.down.values()),
            "bytes-up": sum(self.up.values()),
            "bytes-down-by-site": by_site(self.down),
            "bytes-up-by-site": by_site(self.up),
        }
        self.down, self.up = {}, {}
        return ledger
