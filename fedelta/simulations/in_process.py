"""A federation in one process: the same sites, round and strategy, no Flower.

For strategy experiments that compare many variants: no Ray workers, no message
serialization, one model build per configuration, every round's global state
kept in memory. Each site is a :class:`~fedelta.client.session.ClientSession`
over a ``RecordDict`` of its own (error feedback, SpIEL indices, FedSA's local B,
its DP-SGD accountant), as a SuperNode's ``Context.state`` keeps them, and the
server's :class:`~fedelta.server.round.TrainingRound` validates, weighs and folds
in every reply, ``max-update-norm`` included, as in a Flower run. Byte counts,
sampling, federated evaluation and checkpoints are what
:func:`fedelta.simulations.simulate` adds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import RecordDict

from fedelta.build import build_strategy
from fedelta.client.session import ClientSession, ReplyTransform
from fedelta.compatibility import check_clients_match, check_config
from fedelta.compression import UplinkCompression
from fedelta.config import RunConfig
from fedelta.privacy.accounting import PrivacyAccountant
from fedelta.protocol import Site
from fedelta.server.evaluation import CentralEvaluator
from fedelta.server.head_init import HeadInitialisation
from fedelta.server.round import TrainingRound, update_layout
from fedelta.server.run_folder import with_label_names
from fedelta.strategies import Strategy
from fedelta.strategies.heads import build_head
from fedelta.tasks import build_task

log = logging.getLogger("fedelta")


@dataclass
class InProcessRun:
    rows: list[dict[str, Any]]
    """Central test metrics and the round's training numbers per round (round 0: the
    initial model)."""
    states: list[dict[str, torch.Tensor]] = field(repr=False)
    """The global state after every round (index 0: initial)."""
    evaluator: CentralEvaluator = field(repr=False)


def federate(
    config: RunConfig,
    strategy: Strategy | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    *,
    reply_transform: ReplyTransform | None = None,
) -> InProcessRun:
    """Run ``config``'s rounds with every client of ``simulation.num-supernodes``
    taking part in every round (``fraction-train`` is not applied).

    ``reply_transform`` changes a site's training reply before the server reads it,
    as :func:`fedelta.client.app.with_reply_transform` does in a Flower run. A short
    round (fewer usable updates than ``min-train-replies``) leaves the global state
    as it was: with every site asked already, there is no one else to retry with.
    Secure aggregation only hides the uploads from the server; here their weighted
    mean is formed in the clear (SecAgg+ gives the same mean, to its quantization)."""
    check_config(config)
    config = with_label_names(config.replace(**{"privacy.secure-aggregation": False}))
    strategy = strategy or build_strategy(config)
    check_clients_match(strategy, config)
    evaluator = CentralEvaluator(config)
    task = build_task(config)
    state = strategy.initial_state(evaluator.initial_state)
    layout = update_layout(state, evaluator.layout)
    compression = UplinkCompression(config.compression, config.seed)
    clients = config.simulation.num_supernodes
    sites = [Site(i, clients, f"client-{i}") for i in range(clients)]
    ranks = {site.name: site.rank(config) for site in sites}
    site_states = {site.name: RecordDict() for site in sites}
    accountants: dict[str, PrivacyAccountant] = {}
    head_row: dict[str, Any] = {}
    if build_head(config).initialises:  # strategy.head = "ncm"
        init = HeadInitialisation(strategy, config, state, evaluator.model)
        for site in sites:
            session = ClientSession(site, site_states[site.name])
            init.receive(site.name, session.head_statistics(init.content()))
        state, head_row = init.close()
    rows = [{"round": 0, **task.metrics(evaluator(state), "test"), **head_row}]
    states = [state]
    for server_round in range(1, config.num_server_rounds + 1):
        train = TrainingRound(
            strategy,
            config,
            server_round=server_round,
            global_state=state,
            layout=layout,
            ranks=ranks,
            population=len(sites),
            compression=compression,
            accountants=accountants,
        )
        for site in sites:
            session = ClientSession(site, site_states[site.name], reply_transform)
            train.receive(site.name, session.train(train.content(site.name)))
        new_state, train_row = train.close()
        if new_state is None:
            log.warning("round %d skipped: the global model is unchanged", server_round)
            train_row["round-skipped"] = True
        else:
            state = new_state
        states.append(state)
        row = {"round": server_round, **task.metrics(evaluator(state), "test"), **train_row}
        rows.append(row)
        if on_round is not None:
            on_round(row)
    return InProcessRun(rows, states, evaluator)
