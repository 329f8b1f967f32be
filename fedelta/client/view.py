"""The global model as one client sees it, given its rank and the strategy's LoRA rule.

A lower-rank client takes the first components of the global adapter (B rescaled
so the product is unchanged); exact rules fold the components it cannot hold into
its frozen base weights, together with the server's own fold, so the client
trains on exactly the global model. FFA-LoRA's A is regenerated from the shared
seed instead of sent; FedSA-LoRA's B comes from the site's own state.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedelta.lora import (
    A_SUFFIX,
    B_SUFFIX,
    apply_fold,
    client_view,
    decode_fold,
    seeded_lora_A,
)
from fedelta.models import adapter_layout, load_adapter_state
from fedelta.strategies.lora import LoraAggregation
from fedelta.tensors import TensorDict


def load_client_view(
    model: torch.nn.Module,
    rule: LoraAggregation,
    rank: int,
    received: Mapping[str, torch.Tensor],
    fold: Mapping[str, torch.Tensor],
    local: Mapping[str, torch.Tensor],
    *,
    initial_state: Mapping[str, torch.Tensor],
    seed: int,
) -> TensorDict:
    """Load adapter and base corrections into ``model`` (of LoRA rank ``rank``).

    ``received`` are the adapter tensors the server sent (global rank), ``fold`` its
    base corrections as sent, ``local`` the tensors this site keeps, and
    ``initial_state`` the model's own initial adapter (FedSA's B before the first
    round). Returns the adapter state the client starts training from.
    """
    global_rank = rule.scaling.global_rank
    full = dict(received)
    for name, shape in adapter_layout(model).items():
        if name in full:
            continue
        if name.endswith(A_SUFFIX):  # never sent: the shared seeded A
            full[name] = seeded_lora_A(seed, name[: -len(A_SUFFIX)], global_rank, shape[1])
        elif name.endswith(B_SUFFIX):  # kept by the site: replaced below
            full[name] = torch.zeros(shape[0], global_rank)
    start, tail = client_view(full, rank, rule.scaling)
    if rule.local_b:
        for name in start:
            if name.endswith(B_SUFFIX):
                start[name] = local.get(name, initial_state[name])
    corrections = decode_fold(fold)
    if rule.folds_tail:
        for module, extra in tail.items():
            corrections[module] = corrections[module] + extra if module in corrections else extra
    load_adapter_state(model, start)
    apply_fold(model, corrections)
    return start
