"""A federation in one process: the same sites, round and strategy, no Flower.

For strategy experiments that compare many variants: no Ray workers, no message
serialization, one model build per configuration, every round's global state
kept in memory. Each site is a :class:`~fedelta.client.session.ClientSession`
over a ``RecordDict`` of its own (error feedback, SpIEL indices, FedSA's local B,
kept optimizer state, SCAFFOLD's control variate, its DP-SGD accountant), as a
SuperNode's ``Context.state`` keeps them, and the server's
:class:`~fedelta.server.round.TrainingRound` validates, weighs and folds in every
reply, ``max-update-norm`` included, as in a Flower run. Sites are sampled as the
Flower server samples them (``fraction-train`` over the sorted site names, with the
server's seeded RNG), so both engines train the same sites in the same rounds as
long as federated evaluation does not draw a sample of its own
(``fraction-evaluate`` 0 or 1). Bytes are the serialized size of each message's
content; Flower adds a few hundred bytes of metadata per message.

:func:`run_in_process` writes the run folder a Flower run writes (``config.toml``,
``metrics.jsonl``, a checkpoint per round, the adapter, ``summary.json``), so
``fedelta report``, ``fedelta export``, resume and experiment grids
(``[experiment] engine = "in-process"``) read it the same way. Federated
evaluation and secure aggregation are what :func:`fedelta.simulations.simulate`
adds: here ``fraction-evaluate`` is not applied, and a securely aggregated run's
weighted mean is formed in the clear (SecAgg+ gives the same mean, to its
quantization).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import RecordDict
from tqdm.auto import tqdm

from fedelta.build import build_strategy
from fedelta.client.session import ClientSession, ReplyTransform
from fedelta.compatibility import check_clients_match, check_config
from fedelta.compression import UplinkCompression
from fedelta.config import RunConfig
from fedelta.privacy.accounting import PrivacyAccountant
from fedelta.protocol import Site
from fedelta.server.app import run_dir_for
from fedelta.server.evaluation import CentralEvaluator
from fedelta.server.federation import BudgetsSpentError, round_postfix
from fedelta.server.head_init import HeadInitialisation
from fedelta.server.ledger import serialized_bytes
from fedelta.server.metrics import SUMMARY_FILE, format_table, write_summary
from fedelta.server.round import TrainingRound, update_layout
from fedelta.server.run_folder import RunFolder, with_label_names
from fedelta.server.sampling import sample_sites
from fedelta.simulations.memory import PeakMemory
from fedelta.simulations.preflight import preflight
from fedelta.simulations.report import write_run_report
from fedelta.simulations.results import RunResult, record_strategy
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
    """The global state after every round this call trained (index 0: the state it
    started from)."""
    evaluator: CentralEvaluator = field(repr=False)


def federate(
    config: RunConfig,
    strategy: Strategy | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    *,
    reply_transform: ReplyTransform | None = None,
    run_dir: Path | None = None,
) -> InProcessRun:
    """Run ``config``'s rounds in this process, sampling ``fraction-train`` of the
    ``simulation.num-supernodes`` sites each round as the Flower server does.

    ``reply_transform`` changes a site's training reply before the server reads it,
    as :func:`fedelta.client.app.with_reply_transform` does in a Flower run. A short
    round (fewer usable updates than ``min-train-replies``) leaves the global state
    as it was. With ``run_dir``, every round is recorded and checkpointed there and a
    run with ``resume`` continues from its last checkpoint (sites start afresh, as
    SuperNodes do after a restart); :func:`run_in_process` is the usual way in."""
    check_config(config)
    started = time.monotonic()
    config = with_label_names(config)
    folder = RunFolder(run_dir, config) if run_dir is not None else None
    run_config = config.replace(**{"privacy.secure-aggregation": False})
    strategy = strategy or build_strategy(config)
    check_clients_match(strategy, config)
    evaluator = CentralEvaluator(run_config)
    task = build_task(run_config)
    compression = UplinkCompression(config.compression, config.seed)
    clients = config.simulation.num_supernodes
    sites = {f"client-{i}": Site(i, clients, f"client-{i}") for i in range(clients)}
    ranks = {name: site.rank(run_config) for name, site in sites.items()}
    site_states = {name: RecordDict() for name in sites}
    accountants: dict[str, PrivacyAccountant] = {}
    exhausted: set[str] = set()
    rows: list[dict[str, Any]] = []
    if folder is not None:
        folder.prepare(config.resume)
    if folder is not None and config.resume:
        state, rng, done, accountants = folder.restore(strategy)
        rows = folder.metrics.rows()
    else:
        state = strategy.initial_state(evaluator.initial_state)
        rng, done = np.random.default_rng(config.seed), 0
        head_row: dict[str, Any] = {}
        if build_head(config).initialises:  # strategy.head = "ncm"
            init = HeadInitialisation(strategy, run_config, state, evaluator.model)
            for name, site in sites.items():
                session = ClientSession(site, site_states[name])
                init.receive(name, session.head_statistics(init.content()))
            state, head_row = init.close()
        rows.append({"round": 0, **task.metrics(evaluator(state), "test"), **head_row})
        if folder is not None:
            folder.record(rows[0], state, strategy, rng, accountants)
    layout = update_layout(state, evaluator.layout)
    states = [state]
    stopped = None
    for server_round in range(done + 1, config.num_server_rounds + 1):
        round_started = time.monotonic()
        available = sorted(set(sites) - exhausted)
        try:
            BudgetsSpentError.check(exhausted, len(available), config.min_train_nodes)
        except BudgetsSpentError as err:
            stopped = f"{err}; training stopped after round {server_round - 1}"
            log.warning(stopped)
            break
        sampled = sample_sites(rng, available, config.fraction_train, config.min_train_nodes)
        train = TrainingRound(
            strategy,
            run_config,
            server_round=server_round,
            global_state=state,
            layout=layout,
            ranks={name: ranks[name] for name in sampled},
            population=len(available),
            compression=compression,
            accountants=accountants,
        )
        down: dict[str, int] = {}
        up: dict[str, int] = {}
        for name in sampled:
            content = train.content(name)
            reply = ClientSession(sites[name], site_states[name], reply_transform).train(content)
            down[name], up[name] = serialized_bytes(content), serialized_bytes(reply)
            train.receive(name, reply)
        exhausted |= train.exhausted
        new_state, train_row = train.close()
        if new_state is None:
            log.warning("round %d skipped: the global model is unchanged", server_round)
            train_row["round-skipped"] = True
        else:
            state = new_state
        states.append(state)
        row = {"round": server_round, **task.metrics(evaluator(state), "test"), **train_row}
        row |= {
            "bytes-down": sum(down.values()),
            "bytes-up": sum(up.values()),
            "bytes-down-by-site": down,
            "bytes-up-by-site": up,
            "wall-seconds": round(time.monotonic() - round_started, 3),
        }
        rows.append(row)
        if folder is not None:
            folder.record(row, state, strategy, rng, accountants)
        if on_round is not None:
            on_round(row)
    if folder is not None:
        folder.finish(evaluator, strategy, state, started, stopped)
    return InProcessRun(rows, states, evaluator)


def run_in_process(
    config: RunConfig,
    *,
    strategy: Strategy | None = None,
    progress: bool = True,
    nested: bool = False,
    report: bool = True,
) -> RunResult:
    """:func:`fedelta.simulations.simulate`'s counterpart without Flower: the same
    run folder, metrics, checkpoints, adapter and report, from one process (see the
    module docstring for what it leaves out)."""
    run_dir = run_dir_for(config)
    config = config.replace(output_dir=str(run_dir))
    preflight(config)
    record_strategy(run_dir, strategy, config.resume)
    bar = tqdm(
        total=config.num_server_rounds,
        desc=run_dir.name if nested else "rounds",
        unit="round",
        disable=not progress,
        position=int(nested),
        leave=not nested,
    )

    def on_round(row: dict[str, Any]) -> None:
        if bar.n == 0:
            bar.update(row["round"] - 1)  # a resumed run starts after its checkpoint
        bar.set_postfix(round_postfix(row), refresh=False)
        bar.update(1)

    with PeakMemory() as memory:
        federate(config, strategy, on_round, run_dir=run_dir)
    bar.close()
    summary = json.loads((run_dir / SUMMARY_FILE).read_text(encoding="utf-8"))
    summary |= {"engine": "in-process", "peak-rss-mb": round(memory.peak_bytes / 2**20, 1)}
    write_summary(run_dir, summary)
    result = RunResult.load(run_dir)
    if progress and not nested:
        print(format_table(result.rows), flush=True)
    if report:
        write_run_report(result)
    return result
