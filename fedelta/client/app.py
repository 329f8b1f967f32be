"""fedelta's ClientApp (Flower Message API): train, evaluate, and say who it is."""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedelta import deltas, protocol
from fedelta.client.trainer import ClientTrainer, Site
from fedelta.models import TensorDict

app = ClientApp()


def _receive(msg: Message, context: Context) -> tuple[ClientTrainer, TensorDict, int]:
    """The trainer for this node under the message's config, the global state, the round."""
    config, server_round = protocol.read_config(msg.content)
    trainer = ClientTrainer(config, Site.from_node_config(context.node_config))
    global_state = deltas.decode(msg.content.array_records[protocol.GLOBAL], trainer.layout)
    return trainer, global_state, server_round


@app.query()
def describe(msg: Message, context: Context) -> Message:
    """Report the site name, so the server can sample and report by site, not node id."""
    site = Site.from_node_config(context.node_config)
    record = ConfigRecord({"name": site.name, protocol.PARTITION_ID: site.partition_id})
    return Message(RecordDict({protocol.SITE: record}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train from the global state and reply with the delta, never the data."""
    trainer, global_state, server_round = _receive(msg, context)
    delta, result = trainer.fit(global_state, server_round)
    metrics = MetricRecord(
        {
            protocol.NUM_EXAMPLES: len(trainer.data.train),
            "train-loss": result.loss,
            "train-steps": result.steps,
        }
    )
    return Message(
        RecordDict({protocol.DELTA: deltas.encode(delta), protocol.METRICS: metrics}),
        reply_to=msg,
    )


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global state on this site's local validation split."""
    trainer, global_state, _ = _receive(msg, context)
    result = trainer.evaluate(global_state)
    metrics = MetricRecord(
        {
            protocol.NUM_EXAMPLES: result.examples,
            "eval-loss": result.loss,
            "eval-accuracy": result.accuracy,
        }
    )
    return Message(RecordDict({protocol.METRICS: metrics}), reply_to=msg)
