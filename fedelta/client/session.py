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

import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedelta import deltas, protocol
from fedelta.client.trainer import ClientTrainer
from fedelta.compression import ClientMemory
from fedelta.privacy.accounting import PrivacyAccountant, PrivacyBudgetError
from fedelta.privacy.secure_aggregation import masked_upload
from fedelta.protocol import Site
from fedelta.strategies.aggregators.base import SITE_WEIGHT
from fedelta.strategies.heads import class_feature_sums
from fedelta.strategies.optimizers import ControlVariates
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
    control: TensorDict = field(default_factory=dict)
    """SCAFFOLD's ``c_i`` (empty: zeros, or never trained under SCAFFOLD)."""
    control_round: int = 0
    """The round ``control`` was last changed."""

    @classmethod
    def load(cls, state: RecordDict) -> SiteState:
        """The state a ``RecordDict`` holds (empty before the site's first round)."""
        local = state.array_records.get(protocol.LOCAL_ADAPTER)
        optimizer = state.array_records.get(protocol.OPTIMIZER_STATE)
        control = state.array_records.get(protocol.LOCAL_CONTROL)
        control_round = state.config_records.get(protocol.LOCAL_CONTROL_ROUND)
        return cls(
            ClientMemory.load(state),
            deltas.decode(local) if local is not None else {},
            PrivacyAccountant.load(state),
            deltas.decode(optimizer) if optimizer is not None else {},
            deltas.decode(control) if control is not None else {},
            int(control_round["round"]) if control_round is not None else 0,
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
        if self.control:
            state[protocol.LOCAL_CONTROL] = deltas.encode(self.control)
            state[protocol.LOCAL_CONTROL_ROUND] = ConfigRecord({"round": self.control_round})

    def control_variates(self, content: RecordDict, site: str) -> ControlVariates | None:
        """SCAFFOLD's ``c`` and this site's ``c_i`` for a training message (``None``
        when it carries no ``c``). The server's copy of ``c_i``, when sent, wins; else
        the site's own, which must be of the round the server says it holds.

        Raises
        ------
        RuntimeError
            If the site's own ``c_i`` is missing or stale and none was sent (its node
            lost its state mid-run); the server sends it with the next message."""
        record = content.array_records.get(protocol.CONTROL)
        if record is None:
            return None
        server = deltas.decode(record)
        sent = content.array_records.get(protocol.SITE_CONTROL)
        instructions = content.config_records.get(protocol.STRATEGY)
        held_round = int(instructions.get(protocol.CONTROL_ROUND, 0)) if instructions else 0
        if sent is not None:
            own = deltas.decode(sent)
        elif held_round == 0:
            own = {k: torch.zeros_like(c) for k, c in server.items()}
        elif self.control and self.control_round == held_round:
            own = self.control
        else:
            raise RuntimeError(
                f"site {site!r} holds no SCAFFOLD control variate of round {held_round} "
                f"(its own is of round {self.control_round}: its node state was reset?); "
                "the server sends it its copy next round"
            )
        return ControlVariates(server, own)


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
        control = state.control_variates(content, self.site.name)
        try:
            out = trainer.fit(
                start,
                server_round,
                instructions,
                state.memory,
                state.accountant,
                optimizer_state=state.optimizer,
                control=control,
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
        if control is not None and out.control_change is not None:
            state.control = {k: control.site[k] + d for k, d in out.control_change.items()}
            state.control_round = server_round
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
        if out.control_change is not None:
            reply[protocol.CONTROL_DELTA] = deltas.encode(out.control_change)
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
