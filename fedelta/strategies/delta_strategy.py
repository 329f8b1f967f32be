"""A strategy composed of a LoRA aggregation, norm bounding, an aggregator and
a server optimizer: the form every built-in strategy takes.

Per reply: the LoRA rule maps the client's delta into its aggregation space
(padded factors, or exact weight updates), norm bounding clips it, the
aggregator takes it (streamed for the mean, buffered for robust rules). At the
end of the round the server optimizer steps the LoRA rule's parameters with the
combined update, and the LoRA rule turns the result into the next global state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedelta.lora import rank_layout
from fedelta.strategies.aggregators import Aggregator, Mean
from fedelta.strategies.aggregators.base import SITE_WEIGHT
from fedelta.strategies.base import Capabilities, EmptyRoundError, Strategy
from fedelta.strategies.lora import LoraAggregation
from fedelta.strategies.optimizers import FedAvg, ServerOptimizer
from fedelta.strategies.optimizers.base import Scalar
from fedelta.tensors import Delta, Layout, TensorDict, clip_to_norm, densify, layout_of


class DeltaStrategy(Strategy):
    """``lora`` x ``clip_norm`` x ``aggregator`` x ``optimizer``, each replaceable."""

    def __init__(
        self,
        lora: LoraAggregation,
        optimizer: ServerOptimizer | None = None,
        aggregator: Aggregator | None = None,
        clip_norm: float = 0.0,
    ) -> None:
        self.lora = lora
        self.optimizer = optimizer or FedAvg()
        self.aggregator = aggregator or Mean()
        self.clip_norm = clip_norm
        self._clipped = self._received = 0
        self._steps: int | None = None

    @property
    def name(self) -> str:
        """``optimizer+lora[+robust][+clip]``, as shown in reports."""
        parts = [self.optimizer.name, self.lora.name]
        if self.aggregator.name != "mean":
            parts.append(self.aggregator.name)
        if self.clip_norm:
            parts.append(f"clip{self.clip_norm:g}")
        return "+".join(parts)

    @property
    def capabilities(self) -> Capabilities:
        """The LoRA rule's guarantees, narrowed by the aggregator and clipping:
        robust rules are not sums (neither exact nor linear), and server-side norm
        bounding needs each client's update in the clear."""
        return Capabilities(
            exact=self.lora.exact and self.aggregator.linear,
            linear=self.lora.linear
            and self.aggregator.linear
            and not self.clip_norm
            and not self.optimizer.reads_each_reply,
            heterogeneous_ranks=self.lora.heterogeneous_ranks,
            dp_friendly=self.lora.dp_friendly,
            streaming=self.aggregator.streaming,
        )

    def initial_state(self, adapter_state: Mapping[str, torch.Tensor]) -> TensorDict:
        return self.lora.initial_state(adapter_state)

    def client_config(self, server_round: int) -> dict[str, bool | int | float | str]:
        """The optimizer's and the aggregator's settings; a strategy that can be securely
        aggregated also tells sites the weight it gives each (they weigh their masked
        uploads themselves)."""
        config = self.optimizer.client_config() | self.aggregator.client_config()
        if self.capabilities.linear and self.aggregator.site_weight is not None:
            config[SITE_WEIGHT] = self.aggregator.site_weight
        return config

    def reply_weight(self, num_examples: int) -> float:
        return self.aggregator.weight(num_examples)

    def downlink(self, global_state: Mapping[str, torch.Tensor]) -> tuple[TensorDict, TensorDict]:
        return self.lora.downlink(global_state)

    def uplink_layout(self, global_layout: Layout, rank: int | None = None) -> Layout:
        sent = {k: v for k, v in global_layout.items() if self.lora.exchanged(k)}
        return rank_layout(sent, rank or self.lora.scaling.global_rank)

    def begin_round(
        self,
        server_round: int,
        global_state: Mapping[str, torch.Tensor],
        ranks: Sequence[int] = (),
        population: int | None = None,
    ) -> None:
        self.lora.begin(server_round, global_state, ranks)
        sampled = len(ranks) or 1
        self.aggregator.sampling(sampled, population or sampled)
        self.aggregator.begin(server_round)
        self.optimizer.begin_round(
            server_round, self.uplink_layout(layout_of(global_state)), population or sampled
        )
        self._clipped = self._received = 0
        self._steps = None

    def site_downlink(self, site: str) -> tuple[dict[str, TensorDict], dict[str, Scalar]]:
        return self.optimizer.site_downlink(site)

    def reply_layouts(self, layout: Layout) -> dict[str, Layout]:
        return self.optimizer.reply_layouts(layout)

    def observe_reply(self, site: str, steps: int | None, extras: Mapping[str, TensorDict]) -> None:
        """The optimizer takes the reply's extra records; its step count is kept for
        the :meth:`accumulate` that follows."""
        self.optimizer.observe_reply(site, extras)
        self._steps = steps

    def accumulate(self, delta: Delta, weight: float, rank: int | None = None) -> None:
        """Sparse tensors stay sparse into the mean when the LoRA rule combines factors at
        the client's rank; otherwise they are densified first (rank lifting, weight
        updates, robust rules all need every coordinate)."""
        if weight <= 0:
            raise ValueError(f"num-examples must be positive, got {weight}")
        rank = rank or self.lora.scaling.global_rank
        sparse_ok = (
            self.aggregator.sparse
            and self.lora.factor_space
            and rank == self.lora.scaling.global_rank
        )
        if not sparse_ok:
            delta = densify(delta)
        update = self.lora.update(delta, rank)
        steps, self._steps = self._steps, None
        update = self.optimizer.normalise(update, weight, steps)
        if self.clip_norm:
            update, clipped = clip_to_norm(update, self.clip_norm)
            self._clipped += clipped
        self.aggregator.add(update, weight)
        self.lora.observe(delta, rank, weight)
        self._received += 1

    def finish_round(self, global_state: Mapping[str, torch.Tensor]) -> TensorDict:
        if not self._received:
            raise EmptyRoundError("no client update was accumulated this round")
        combined = self.aggregator.result()
        # Tensors nobody sent this round (Half Fine-Tuning froze them) stay as they are.
        params = {k: v for k, v in self.lora.params().items() if k in combined}
        return self.lora.finish(self.optimizer.step(params, combined))

    def round_metrics(self) -> dict[str, float]:
        metrics = self.lora.metrics() | self.aggregator.metrics()
        if self.clip_norm:
            metrics["clients-clipped"] = float(self._clipped)
        return metrics

    def state_dict(self) -> tuple[TensorDict, dict[str, Any]]:
        meta: dict[str, Any] = {"strategy": self.name}
        if aggregator := self.aggregator.state_dict():
            meta["aggregator"] = aggregator
        return self.optimizer.state_dict(), meta

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        saved = meta.get("strategy")
        if saved is not None and saved != self.name:
            raise ValueError(f"checkpoint was written by strategy {saved!r}, not {self.name!r}")
        self.optimizer.load_state_dict(tensors)
        self.aggregator.load_state_dict(meta.get("aggregator", {}))
