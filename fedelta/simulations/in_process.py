"""A federation in one process: the same trainer, strategy and evaluation, no Flower.

For strategy experiments that compare many variants: no Ray workers, no message
serialization, one model build per configuration, every round's global state
kept in memory. Each client's upload still goes through the wire encoding and
the server's decoding, and each site keeps its memory (error feedback, SpIEL
indices, FedSA's local B) across rounds, as a SuperNode does. Byte counts,
failures and checkpoints are what :func:`fedelta.simulations.simulate` adds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from fedelta.build import build_strategy
from fedelta.client.trainer import ClientTrainer
from fedelta.compatibility import check_config
from fedelta.compression import ClientMemory
from fedelta.config import RunConfig
from fedelta.privacy.accounting import PrivacyAccountant
from fedelta.protocol import Site
from fedelta.server.evaluation import CentralEvaluator
from fedelta.strategies import Strategy
from fedelta.tasks import build_task


@dataclass
class InProcessRun:
    rows: list[dict[str, Any]]
    """Central test metrics per round (round 0: the initial model)."""
    states: list[dict[str, torch.Tensor]] = field(repr=False)
    """The global state after every round (index 0: initial)."""
    evaluator: CentralEvaluator = field(repr=False)


def federate(
    config: RunConfig,
    strategy: Strategy | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> InProcessRun:
    """Run ``config``'s rounds with every client of ``simulation.num-supernodes``
    taking part in every round (``fraction-train`` is not applied)."""
    check_config(config)
    strategy = strategy or build_strategy(config)
    evaluator = CentralEvaluator(config)
    task = build_task(config)
    state = strategy.initial_state(evaluator.initial_state)
    clients = config.simulation.num_supernodes
    sites = [Site(i, clients, f"client-{i}") for i in range(clients)]
    memories = {site.name: ClientMemory() for site in sites}
    accountants = {site.name: PrivacyAccountant() for site in sites}
    kept: dict[str, dict[str, torch.Tensor]] = {site.name: {} for site in sites}
    rows = [{"round": 0, **task.metrics(evaluator(state), "test")}]
    states = [state]
    equal_weights = config.privacy.client_dp != "none"
    for server_round in range(1, config.num_server_rounds + 1):
        ranks = [s.rank(config) for s in sites]
        strategy.begin_round(server_round, state, ranks, population=len(sites))
        adapter, fold = strategy.downlink(state)
        instructions = strategy.client_config(server_round)
        losses, epsilons = [], {}
        for site in sites:
            trainer = ClientTrainer(config, site)
            start = trainer.receive(adapter, fold, kept[site.name])
            out = trainer.fit(
                start, server_round, instructions, memories[site.name], accountants[site.name]
            )
            kept[site.name] = out.kept or kept[site.name]
            delta = trainer.compression.decode(out.upload, trainer.uplink_layout, server_round)
            weight = 1 if equal_weights else len(trainer.data.train)
            strategy.accumulate(delta, weight, trainer.rank)
            losses.append(out.result.loss)
            if out.private is not None:
                epsilons[site.name] = out.private.epsilon
        state = strategy.finish_round(state)
        states.append(state)
        row = {"round": server_round, **task.metrics(evaluator(state), "test")}
        row["train-loss"] = sum(losses) / len(losses)
        if epsilons:
            row["dp-epsilon"] = max(epsilons.values())
        row |= strategy.round_metrics()
        rows.append(row)
        if on_round is not None:
            on_round(row)
    return InProcessRun(rows, states, evaluator)
