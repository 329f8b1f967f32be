"""The strategy interface: how client deltas become the next global state.

A strategy sees one round at a time: :meth:`Strategy.begin_round`, then
:meth:`Strategy.accumulate` for each reply *as it arrives*, then
:meth:`Strategy.finish_round`, which returns the new global state. Whatever it
carries across rounds (server optimizer moments, for instance) lives in
:meth:`Strategy.state_dict` so that checkpoints and ``--resume`` restore it exactly.

The global state is the adapter state (LoRA factors and head, by parameter name)
plus, for strategies that fold updates into the base weights, one
``fold/<module>`` correction per adapted module.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedelta.tensors import Layout, TensorDict


class EmptyRoundError(RuntimeError):
    """A round ended with no usable update; averaging over nothing is refused."""


@dataclass(frozen=True)
class Capabilities:
    """What a strategy guarantees, as the capability matrix states it."""

    exact: bool
    """The global LoRA update equals sum_i w_i * scale_i * B_i A_i (with plain averaging)."""
    linear: bool
    """The server only needs the sum of what clients upload: secure aggregation works."""
    heterogeneous_ranks: bool
    """Clients may train different LoRA ranks."""
    dp_friendly: bool
    """Clipping and noising the upload bounds the update it causes (client-level DP)."""
    streaming: bool
    """Server memory does not grow with the number of clients in a round."""


class Strategy(ABC):
    """Aggregates client deltas into a new global state."""

    @property
    @abstractmethod
    def capabilities(self) -> Capabilities:
        """The guarantees of this strategy (see :class:`Capabilities`)."""

    def initial_state(self, adapter_state: Mapping[str, torch.Tensor]) -> TensorDict:
        """The round-0 global state built from the freshly initialised adapter."""
        return dict(adapter_state)

    def client_config(self, server_round: int) -> dict[str, bool | int | float | str]:
        """Extra settings sent to clients this round (e.g. a proximal term)."""
        return {}

    def downlink(self, global_state: Mapping[str, torch.Tensor]) -> tuple[TensorDict, TensorDict]:
        """What clients receive: adapter tensors, and fold tensors (empty if none)."""
        return dict(global_state), {}

    def uplink_layout(self, global_layout: Layout, rank: int | None = None) -> Layout:
        """Names and shapes a valid delta from a client of ``rank`` must have."""
        return global_layout

    @abstractmethod
    def begin_round(
        self,
        server_round: int,
        global_state: Mapping[str, torch.Tensor],
        ranks: Sequence[int] = (),
        population: int | None = None,
    ) -> None:
        """Prepare empty accumulators; ``ranks`` are those of the sampled clients,
        ``population`` the number of sites they were sampled from."""

    def site_downlink(
        self, site: str
    ) -> tuple[dict[str, TensorDict], dict[str, bool | int | float | str]]:
        """Extra records (record name to tensors) and instructions for ``site``'s
        training message this round, beyond what every site gets (SCAFFOLD's control
        variates); none by default."""
        return {}, {}

    def reply_layouts(self, layout: Layout) -> dict[str, Layout]:
        """Extra records a training reply must carry besides the delta of ``layout``
        (record name to layout); none by default."""
        return {}

    def observe_reply(self, site: str, steps: int | None, extras: Mapping[str, TensorDict]) -> None:
        """See a valid reply of ``site`` just before its :meth:`accumulate`: the local
        steps it reports and its extra records (validated against
        :meth:`reply_layouts`)."""
        return None

    def reply_weight(self, num_examples: int) -> float:
        """A reply's weight in the round: its example count, so sites with more data
        count more. Both engines weigh every plain reply with it."""
        return float(num_examples)

    @abstractmethod
    def accumulate(
        self, delta: Mapping[str, torch.Tensor], weight: float, rank: int | None = None
    ) -> None:
        """Fold one validated client delta (from a client of ``rank``) into the round
        with ``weight``: what :meth:`reply_weight` gave its reply, or the total weight
        of a securely aggregated sum."""

    @abstractmethod
    def finish_round(self, global_state: Mapping[str, torch.Tensor]) -> TensorDict:
        """The next global state; raises :class:`EmptyRoundError` if nothing arrived."""

    def round_metrics(self) -> dict[str, float]:
        """Strategy-specific numbers for this round's metrics row."""
        return {}

    def state_dict(self) -> tuple[TensorDict, dict[str, Any]]:
        """Tensors and JSON-able values to checkpoint; stateless strategies keep none."""
        return {}, {}

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        return None
