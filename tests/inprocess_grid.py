"""An in-process Flower ``Grid`` for tests of the server's round loop, without Ray.

It moves each message the way Flower's transport does: as its tree of objects,
deflated to bytes and inflated on the other side, so each ClientApp handler runs on
a copy that went through Flower's serialization, and the bytes it moved are known
independently of fedelta's ledger. A site can be made slow (its replies arrive late)
or broken (its handler raises), and node ids are random per transport, as they are
per Flower run.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable
from dataclasses import dataclass

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import (
    inflate_object_from_contents,
    push_objects,
)

from fedelta import protocol
from fedelta.client.app import app as fedelta_client_app


@dataclass
class Carried:
    """One message the transport moved."""

    node: int
    direction: str
    """"down" (server to node) or "up"."""
    message_type: str
    group_id: str
    size: int
    """Bytes of its serialized objects, as Flower's push sends them."""
    message: Message
    """The message as the receiving side inflated it."""


def _carry(message: Message) -> tuple[Message, int]:
    """Deflate ``message`` into object contents with Flower's push code, inflate it back."""
    contents: dict[str, bytes] = {}
    push_objects(
        get_all_nested_objects(message),
        contents.__setitem__,
        keep_objects=True,
        max_concurrent_pushes=1,
    )
    size = sum(len(content) for content in contents.values())
    copy = inflate_object_from_contents(message.object_id, contents)
    assert isinstance(copy, Message)
    return copy, size


class Transport:
    """A Flower ``Grid`` whose SuperNodes run ``app`` in this process.

    ``slow`` sites answer training ``delay`` seconds late; ``broken`` sites fail every training
    message with a client error."""

    def __init__(
        self,
        num_sites: int,
        app: ClientApp = fedelta_client_app,
        *,
        slow: Iterable[str] = (),
        broken: Iterable[str] = (),
        delay: float = 60.0,
    ) -> None:
        ids = random.Random().sample(range(1, 2**62), num_sites)
        self.site_of = {nid: f"client-{i}" for i, nid in enumerate(ids)}
        self.contexts = {
            nid: Context(
                run_id=1,
                node_id=nid,
                node_config={protocol.PARTITION_ID: i, protocol.NUM_PARTITIONS: num_sites},
                state=RecordDict(),
                run_config={},
            )
            for i, nid in enumerate(ids)
        }
        self.app, self.slow, self.broken, self.delay = app, set(slow), set(broken), delay
        self.carried: list[Carried] = []
        self._replies: dict[str, tuple[float, Message]] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.site_of)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for message in messages:
            node = message.metadata.dst_node_id
            received, size = _carry(message)
            message_id = f"m{len(self.carried)}"
            received.metadata.__dict__["_message_id"] = message_id
            self._log(node, "down", received, size)
            site = self.site_of[node]
            if site in self.broken and received.metadata.message_type == "train":
                reply = Message(Error(code=0, reason="site crashed"), reply_to=received)
            else:
                reply = self._handle(received, self.contexts[node])
            reply, size = _carry(reply)
            reply.metadata.__dict__["_message_id"] = f"r{message_id}"
            self._log(node, "up", reply, size)
            slow = site in self.slow and received.metadata.message_type == "train"
            late = self.delay if slow else 0.0
            self._replies[message_id] = (time.monotonic() + late, reply)
            ids.append(message_id)
        return ids

    def _handle(self, message: Message, context: Context) -> Message:
        """``app`` as a SuperNode runs it: a handler that raises sends an error reply."""
        try:
            return self.app(message, context)
        except Exception as err:
            return Message(Error(code=0, reason=str(err)), reply_to=message)

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        now = time.monotonic()
        ready = [m for m in message_ids if m in self._replies and self._replies[m][0] <= now]
        return [self._replies.pop(m)[1] for m in ready]

    def _log(self, node: int, direction: str, message: Message, size: int) -> None:
        meta = message.metadata
        self.carried.append(
            Carried(node, direction, meta.message_type, meta.group_id, size, message)
        )

    def trained(self, server_round: int) -> list[str]:
        """Sites sent a training message in ``server_round``, sorted."""
        return sorted(
            self.site_of[c.node]
            for c in self.carried
            if c.direction == "down"
            and c.message_type == "train"
            and c.group_id == str(server_round)
        )

    def bytes_by_site(self, direction: str, *, delivered_only: bool = True) -> dict[str, int]:
        """Bytes moved per site in ``direction``; replies still held back are left out."""
        held = {id(m) for _, m in self._replies.values()} if delivered_only else set()
        totals: dict[str, int] = {}
        for c in self.carried:
            if c.direction == direction and id(c.message) not in held:
                site = self.site_of[c.node]
                totals[site] = totals.get(site, 0) + c.size
        return totals
