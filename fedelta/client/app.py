"""fedelta's ClientApp (Flower Message API): train, evaluate, and say who it is.

A thin adapter: each handler reads the node's site from its node config and answers
through a :class:`~fedelta.client.session.ClientSession` over the node's
``Context.state``, the code the in-process engine runs too."""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedelta import protocol
from fedelta.client.session import ClientSession, ReplyTransform
from fedelta.privacy.secure_aggregation import secure_aggregation_mod
from fedelta.protocol import Site

app = ClientApp(mods=[secure_aggregation_mod])


def _session(context: Context, transform: ReplyTransform | None = None) -> ClientSession:
    return ClientSession(Site.from_node_config(context.node_config), context.state, transform)


@app.query()
def describe(msg: Message, context: Context) -> Message:
    """Report the site (name, partition, rank), so the server samples and reports by site."""
    site = Site.from_node_config(context.node_config)
    return Message(RecordDict({protocol.SITE: site.to_record()}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train from the global state and reply with the delta, never the data (see
    :meth:`ClientSession.train <fedelta.client.session.ClientSession.train>`)."""
    return Message(_session(context).train(msg.content), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global state (with this site's own tensors) on its validation split."""
    return Message(_session(context).evaluate(msg.content), reply_to=msg)


@app.query(protocol.HEAD_STATISTICS_ACTION)
def head_statistics(msg: Message, context: Context) -> Message:
    """FedNCM's statistics round, before round 1 (see :meth:`ClientSession.head_statistics
    <fedelta.client.session.ClientSession.head_statistics>`)."""
    return Message(_session(context).head_statistics(msg.content), reply_to=msg)


def with_train(handler: Callable[[Message, Context], Message]) -> ClientApp:
    """fedelta's ClientApp with ``handler`` as its train function: robustness
    experiments wrap :func:`train` to make some sites fail or misbehave."""
    wrapped = ClientApp(mods=[secure_aggregation_mod])
    wrapped.query()(describe)
    wrapped.query(protocol.HEAD_STATISTICS_ACTION)(head_statistics)
    wrapped.evaluate()(evaluate)
    wrapped.train()(handler)
    return wrapped


def with_reply_transform(transform: ReplyTransform) -> ClientApp:
    """fedelta's ClientApp whose training replies go through ``transform``, as
    ``federate(config, reply_transform=transform)`` applies it in one process."""

    def transformed_train(msg: Message, context: Context) -> Message:
        return Message(_session(context, transform).train(msg.content), reply_to=msg)

    return with_train(transformed_train)
