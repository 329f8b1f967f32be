"""Error feedback: what a client did not send stays with it and is sent later.

A client that sparsifies or quantizes its delta keeps the difference between the
delta it meant to send and what the server will decode, and adds it to the next
round's delta (Seide et al., 2014; Stich et al., 2018). The invariant, per
coordinate and over any number of rounds: everything sent + the residual = the
sum of the true deltas. The residual lives in the node's ``Context.state``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedelta.tensors import TensorDict


def corrected(
    delta: Mapping[str, torch.Tensor], residual: Mapping[str, torch.Tensor]
) -> TensorDict:
    """This round's delta plus what earlier rounds left unsent."""
    out: TensorDict = {}
    for name, value in delta.items():
        carried = residual.get(name)
        out[name] = (
            value + carried if carried is not None and carried.shape == value.shape else value
        )
    return out


def remainder(
    intended: Mapping[str, torch.Tensor],
    sent: Mapping[str, torch.Tensor],
    residual: Mapping[str, torch.Tensor],
) -> TensorDict:
    """The new residual: ``intended - sent`` for tensors sent this round; tensors not
    sent this round (Half Fine-Tuning froze them) keep their old residual."""
    new = {k: v for k, v in residual.items() if k not in intended}
    for name, value in intended.items():
        new[name] = value - sent[name]
    return new
