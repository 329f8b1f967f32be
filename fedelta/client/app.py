"""fedelta's ClientApp (Flower Message API): train, evaluate, and say who it is."""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedelta import deltas, protocol
from fedelta.client.trainer import ClientTrainer
from fedelta.compression import ClientMemory
from fedelta.privacy.accounting import PrivacyAccountant, PrivacyBudgetError
from fedelta.privacy.secure_aggregation import masked_upload, secure_aggregation_mod
from fedelta.protocol import Site
from fedelta.tensors import TensorDict

app = ClientApp(mods=[secure_aggregation_mod])


def _receive(msg: Message, context: Context) -> tuple[ClientTrainer, TensorDict, int]:
    """The trainer for this node with the global model loaded as this client sees it,
    the adapter tensors it starts from, and the round."""
    config, server_round = protocol.read_config(msg.content)
    trainer = ClientTrainer(config, Site.from_node_config(context.node_config))
    received = deltas.decode(msg.content.array_records[protocol.GLOBAL], trainer.global_layout)
    fold_record = msg.content.array_records.get(protocol.FOLD)
    fold = deltas.decode(fold_record) if fold_record is not None else {}
    local_record = context.state.array_records.get(protocol.LOCAL_ADAPTER)
    local = deltas.decode(local_record) if local_record is not None else {}
    start = trainer.receive(received, fold, local)
    return trainer, start, server_round


@app.query()
def describe(msg: Message, context: Context) -> Message:
    """Report the site (name, partition, rank), so the server samples and reports by site."""
    site = Site.from_node_config(context.node_config)
    return Message(RecordDict({protocol.SITE: site.to_record()}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train from the global state and reply with the delta, never the data.

    Under DP-SGD the site's accountant lives in its ``Context.state``: a site whose
    budget is spent says so instead of training. Under secure aggregation the delta
    goes out only masked (see :mod:`fedelta.privacy.secure_aggregation`)."""
    trainer, start, server_round = _receive(msg, context)
    privacy = trainer.config.privacy
    strategy = msg.content.config_records.get(protocol.STRATEGY)
    memory = ClientMemory.load(context.state)
    accountant = PrivacyAccountant.load(context.state)
    if (reported := msg.content.config_records.get(protocol.DP_SPENT)) is not None:
        accountant = accountant.at_least(PrivacyAccountant.from_record(reported), privacy.delta)
    try:
        out = trainer.fit(start, server_round, strategy, memory, accountant)
    except PrivacyBudgetError as err:
        if privacy.secure_aggregation:
            raise  # the protocol treats the site as dropped out; the reason travels along
        spent = MetricRecord({protocol.DP_EPSILON: accountant.epsilon(privacy.delta)})
        refusal = ConfigRecord({"reason": str(err)})
        return Message(
            RecordDict({protocol.REFUSED: refusal, protocol.METRICS: spent}), reply_to=msg
        )
    memory.save(context.state)
    if out.kept:
        context.state[protocol.LOCAL_ADAPTER] = deltas.encode(out.kept)
    metrics = {
        protocol.NUM_EXAMPLES: len(trainer.data.train),
        protocol.TRAIN_LOSS: out.result.loss,
        protocol.TRAIN_STEPS: out.result.steps,
    }
    if out.private is not None:
        accountant.save(context.state)
        metrics |= {
            protocol.DP_EPSILON: out.private.epsilon,
            protocol.DP_NOISE: out.private.noise_multiplier,
            protocol.DP_RATE: out.private.sample_rate,
        }
    if privacy.secure_aggregation:
        # Client-level DP weighs every site the same; otherwise by example count.
        weight = 1 if privacy.client_dp != "none" else len(trainer.data.train)
        content = masked_upload(out.upload, weight, privacy)
        content[protocol.METRICS] = MetricRecord(metrics)
        return Message(content, reply_to=msg)
    return Message(
        RecordDict({protocol.DELTA: out.upload, protocol.METRICS: MetricRecord(metrics)}),
        reply_to=msg,
    )


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global state (with this site's own tensors) on its validation split."""
    trainer, _, _ = _receive(msg, context)
    result = trainer.evaluate()
    metrics = MetricRecord(
        {
            protocol.NUM_EXAMPLES: result.examples,
            "eval-loss": result.loss,
            "eval-accuracy": result.accuracy,
        }
    )
    return Message(RecordDict({protocol.METRICS: metrics}), reply_to=msg)


def with_train(handler: Callable[[Message, Context], Message]) -> ClientApp:
    """fedelta's ClientApp with ``handler`` as its train function: robustness
    experiments wrap :func:`train` to make some sites fail or misbehave."""
    wrapped = ClientApp(mods=[secure_aggregation_mod])
    wrapped.query()(describe)
    wrapped.evaluate()(evaluate)
    wrapped.train()(handler)
    return wrapped
