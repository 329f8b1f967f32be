"""Server optimizers: how the aggregated delta moves the global parameters.

Following Reddi et al. ("Adaptive Federated Optimization", ICLR 2021), the
aggregated client delta is a pseudo-gradient and the server takes one optimizer
step with it per round. Parameters and moments are kept in fp32; moments are
checkpointed so a resumed run continues the same trajectory.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import ClassVar

import torch

from fedelta.config import RunConfig
from fedelta.tensors import Delta, Layout, SparseTensor, TensorDict

Scalar = bool | int | float | str


class ServerOptimizer(ABC):
    """One step per round from the aggregated delta."""

    name: ClassVar[str]
    default_lr: ClassVar[float] = 1.0
    client_loss_term: ClassVar[str] = ""
    """What clients add to their training loss for this optimizer (FedProx's proximal
    term); empty when they train on the task loss alone."""
    client_gradient_term: ClassVar[str] = ""
    """What clients add to every gradient before their optimizer step (SCAFFOLD's
    control-variate correction); empty when they do not."""
    reads_each_reply: ClassVar[str] = ""
    """What the optimizer needs from each reply on its own (a step count, a per-site
    tensor); empty when the sum of the uploads is enough (secure aggregation works)."""
    extra_uplink: ClassVar[str] = ""
    """What a reply carries besides the delta (SCAFFOLD's control-variate change),
    which neither client-level DP nor ``[compression]`` touches; empty if nothing."""
    per_site_tensors: ClassVar[bool] = False
    """Keeps tensors per site in the global layout (SCAFFOLD's ``c_i``): every site
    must train every exchanged tensor at the global rank."""
    uses_step_counts: ClassVar[bool] = False
    """Reads each reply's ``train-steps`` (FedNova), which sites report in the clear."""
    fixes: ClassVar[str] = ""
    """What the optimizer is for, in one line (the optimizer matrix shows it)."""
    traffic: ClassVar[str] = "as FedAvg"
    """Bytes on the wire against FedAvg's."""
    client_state: ClassVar[str] = "none"
    """What a site keeps across rounds for this optimizer."""

    def __init__(self, lr: float | None = None) -> None:
        self.lr = self.default_lr if not lr else lr

    @classmethod
    def from_config(cls, config: RunConfig) -> ServerOptimizer:
        """The optimizer with a run's ``[strategy]`` settings (``server-lr`` 0: the
        optimizer's default)."""
        return cls(lr=config.strategy.server_lr or None)

    @abstractmethod
    def step(
        self, params: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]
    ) -> TensorDict:
        """The parameters after applying the aggregated ``delta``."""

    def client_config(self) -> dict[str, bool | int | float | str]:
        """What clients must know to train for this optimizer (FedProx's mu)."""
        return {}

    # -- per-site hooks; the defaults do nothing, as for a plain server step -------------
    def begin_round(self, server_round: int, layout: Layout, population: int) -> None:
        """A round opens over tensors of ``layout`` (the exchanged global tensors);
        ``population`` sites could have been sampled."""
        return None

    def site_downlink(self, site: str) -> tuple[dict[str, TensorDict], dict[str, Scalar]]:
        """Extra records (record name to tensors) and instructions for ``site``'s
        training message this round."""
        return {}, {}

    def reply_layouts(self, layout: Layout) -> dict[str, Layout]:
        """Extra records a reply must carry (record name to layout), given the layout
        of the delta."""
        return {}

    def observe_reply(self, site: str, extras: Mapping[str, TensorDict]) -> None:
        """Take ``site``'s validated extra records (those of :meth:`reply_layouts`)."""
        return None

    def normalise(self, update: Delta, weight: float, steps: int | None) -> Delta:
        """The update as the aggregator should take it, given the reply's weight and
        local step count (FedNova divides by the steps); unchanged by default."""
        return update

    @staticmethod
    def scaled(update: Delta, factor: float) -> Delta:
        """``update`` times ``factor``, sparse tensors kept sparse."""
        return {
            k: v.scaled(factor) if isinstance(v, SparseTensor) else v * factor
            for k, v in update.items()
        }

    def state_dict(self) -> TensorDict:
        return {}

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor]) -> None:
        return None
