"""Exact bytes on the wire: the serialized size of every Flower message sent or received.

Flower 1.39 moves a message as a tree of content-addressed objects (the message,
its records, arrays and array chunks), each sent once. The bytes a message costs
are the sizes of those serialized objects, which is what this counts; transport
framing (gRPC, TLS) comes on top and is not fedelta's to change.
"""

from __future__ import annotations

from flwr.app import Message, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects


def message_bytes(message: Message) -> int:
    """Serialized size of ``message`` and everything it carries, each object once."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


def content_bytes(content: RecordDict) -> int:
    """Serialized size of a message's content alone (no message metadata): what the
    in-process engine counts, where there are no Flower messages."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(content).values())
