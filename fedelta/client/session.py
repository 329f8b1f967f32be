"""A site's side of a federation, whatever carries its messages.

A :class:`ClientSession` turns the content of a server message into the content of
the site's reply, and keeps what the site carries from round to round in a Flower
``RecordDict``: a SuperNode's ``Context.state`` under Flower (fedelta's ClientApp is
a thin adapter over this module), one ``RecordDict`` per site in the in-process
engine. Both engines therefore train, keep state and answer through the same code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedelta import deltas, protocol
from fedelta.client.trainer import ClientTrainer
from fedelta.compression import ClientMemory
from fedelta.privacy.accounting import PrivacyAccountant, PrivacyBudgetError
from fedelta.privacy.secure_aggregation import masked_upload
from fedelta.protocol import Site
from fedelta.strategies.aggregators.base import SITE_WEIGHT
from fedelta.strategies.heads import class_feature_sums
from fedelta.tensors import TensorDict

ReplyTransform = Callable[[Site, int, RecordDict], RecordDict]
"""Changes a site's training reply before it leaves (the site, the round, the reply):
how robustness experiments and tests make a site misbehave, alike in both engines."""


@dataclass
class SiteState:
    """What a site keeps across rounds, in one place: per-site state a method adds
    (control variates, a replica of the downlink) belongs here too."""

    memory: ClientMemory = field(default_factory=ClientMemory)
    """Error-feedback residuals and SpIEL index sets."""
    local: TensorDict = field(default_factory=dict)
    """Adapter tensors the site keeps to itself (FedSA-LoRA's B)."""
    accountant: PrivacyAccountant = field(default_factory=PrivacyAccountant)
    """What DP-SGD has spent of the site's budget."""
    optimizer: TensorDict = field(default_factory=dict)
    """The local optimizer's moments, under ``keep-optimizer-state``."""

    @classmethod
    def load(cls, state: RecordDict) -> SiteState:
        """The state a ``RecordDict`` holds (empty before the site's first round)."""
        local = state.array_records.get(protocol.LOCAL_ADAPTER)
        optimizer = state.array_records.get(protocol.OPTIMIZER_STATE)
        return cls(
            ClientMemory.load(state),
            deltas.decode(local) if local is not None else {},
            PrivacyAccountant.load(state),
            deltas.decode(optimizer) if optimizer is not None else {},
        )

    def save(self, state: RecordDict) -> None:
        """Write into ``state`` what the site has (nothing it never had)."""
        self.memory.save(state)
        if self.local:
            state[protocol.LOCAL_ADAPTER] = deltas.encode(self.local)
        if self.accountant.history:
            self.accountant.save(state)
        if self.optimizer:
            state[protocol.OPTIMIZER_STATE] = deltas.encode(self.optimizer)


class ClientSession:
    """One site answering the server: its data and trainer, its state in ``state``."""

    def __init__(
        self, site: Site, state: RecordDict, transform: ReplyTransform | None = None
    ) -> None:
        self.site = site
        self.state = state
        self.transform = transform

    def _receive(self, content: RecordDict) -> tuple[ClientTrainer, TensorDict, int, SiteState]:
        """The trainer with the global model loaded as this site sees it, the adapter
        tensors it starts from, the round and the site's state."""
        config, server_round = protocol.read_config(content)
        trainer = ClientTrainer(config, self.site)
        received = deltas.decode(content.array_records[protocol.GLOBAL], trainer.global_layout)
        fold_record = content.array_records.get(protocol.FOLD)
        fold = deltas.decode(fold_record) if fold_record is not None else {}
        state = SiteState.load(self.state)
        start = trainer.receive(received, fold, state.local)
        return trainer, start, server_round, state

    def train(self, content: RecordDict) -> RecordDict:
        """Train from the global state and answer with the delta, never the data.

        Under DP-SGD a site whose budget is spent says so instead of training (under
        secure aggregation it raises: the protocol drops it, the reason travels
        along). Under secure aggregation the delta goes out only masked, weighted as
        the strategy asks (see :mod:`fedelta.privacy.secure_aggregation`)."""
        trainer, start, server_round, state = self._receive(content)
        privacy = trainer.config.privacy
        instructions = content.config_records.get(protocol.STRATEGY)
        if (reported := content.config_records.get(protocol.DP_SPENT)) is not None:
            spent = PrivacyAccountant.from_record(reported)
            state.accountant = state.accountant.at_least(spent, privacy.delta)
        try:
            out = trainer.fit(
                start, server_round, instructions, state.memory, state.accountant, state.optimizer
            )
        except PrivacyBudgetError as err:
            if privacy.secure_aggregation:
                raise
            spent_so_far = MetricRecord(
                {protocol.DP_EPSILON: state.accountant.epsilon(privacy.delta)}
            )
            refusal = ConfigRecord({"reason": str(err)})
            return self._sent(
                server_round,
                RecordDict({protocol.REFUSED: refusal, protocol.METRICS: spent_so_far}),
            )
        state.local = out.kept or state.local
        state.optimizer = out.optimizer_state or state.optimizer
        state.save(self.state)
        metrics = {
            protocol.NUM_EXAMPLES: len(trainer.data.train),
            protocol.TRAIN_LOSS: out.result.loss,
            protocol.TRAIN_STEPS: out.result.steps,
        }
        if out.private is not None:
            metrics |= {
                protocol.DP_EPSILON: out.private.epsilon,
                protocol.DP_NOISE: out.private.noise_multiplier,
                protocol.DP_RATE: out.private.sample_rate,
            }
        if privacy.secure_aggregation:
            site_weight = instructions.get(SITE_WEIGHT) if instructions is not None else None
            reply = masked_upload(out.upload, len(trainer.data.train), privacy, site_weight)
        else:
            reply = RecordDict({protocol.DELTA: out.upload})
        reply[protocol.METRICS] = MetricRecord(metrics)
        return self._sent(server_round, reply)

    def _sent(self, server_round: int, reply: RecordDict) -> RecordDict:
        """``reply`` as it leaves the site (through the transform, if any)."""
        return reply if self.transform is None else self.transform(self.site, server_round, reply)

    def head_statistics(self, content: RecordDict) -> RecordDict:
        """FedNCM (``strategy.head = "ncm"``): per class, the sum of the head-input
        features of this site's training examples under the global model, and their
        count; no example leaves the site, only these sums."""
        trainer, _, _, _ = self._receive(content)
        loader = trainer.task.make_loader(
            trainer.data.train, trainer.tokenizer, trainer.task.eval_batch_size, train=False
        )
        stats = class_feature_sums(trainer.model, loader)
        metrics = MetricRecord({protocol.NUM_EXAMPLES: len(trainer.data.train)})
        return RecordDict(
            {protocol.HEAD_STATISTICS: deltas.encode(stats.tensors()), protocol.METRICS: metrics}
        )

    def evaluate(self, content: RecordDict) -> RecordDict:
        """Evaluate the global state (with this site's own tensors) on its validation split."""
        trainer, _, _, _ = self._receive(content)
        result = trainer.evaluate()
        metrics = MetricRecord(
            {
                protocol.NUM_EXAMPLES: result.examples,
                "eval-loss": result.loss,
                "eval-accuracy": result.accuracy,
            }
        )
        return RecordDict({protocol.METRICS: metrics})
