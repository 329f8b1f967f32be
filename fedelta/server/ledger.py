"""Exact bytes on the wire: the serialized size of every Flower message sent or received.

Flower 1.39 moves a message as a tree of content-addressed objects (the message,
its records, arrays and array chunks), each sent once. The bytes a message costs
are the sizes of those serialized objects, which is what this counts; transport
framing (gRPC, TLS) comes on top and is not fedelta's to change.
"""

from __future__ import annotations

from flwr.app import Message, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects


def serialized_bytes(obj: Message | RecordDict) -> int:
    """Serialized size of a message (or of a message's content alone, as the in-process
    engine counts it) and everything it carries, each object once."""
    return sum(len(o.deflate()) for o in get_all_nested_objects(obj).values())
