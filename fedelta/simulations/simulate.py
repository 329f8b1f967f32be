"""One-machine federations on Flower's Simulation Engine (Ray), from Python or the CLI.

The ServerApp runs in this process; each virtual SuperNode's ClientApp runs in a
Ray worker process that builds its model once and reuses it for every client and
round it serves.
"""

from __future__ import annotations

import json
import logging
import os

from flwr.clientapp import ClientApp

from fedelta.client.app import app as fedelta_client_app
from fedelta.config import RunConfig
from fedelta.server.app import make_server_app, run_dir_for
from fedelta.server.metrics import SUMMARY_FILE, write_summary
from fedelta.simulations.memory import PeakMemory
from fedelta.simulations.preflight import preflight
from fedelta.simulations.report import write_run_report
from fedelta.simulations.results import RunResult, record_strategy
from fedelta.strategies import Strategy


def simulate(
    config: RunConfig,
    *,
    strategy: Strategy | None = None,
    client_app: ClientApp | None = None,
    progress: bool = True,
    nested: bool = False,
    report: bool = True,
    verbose: bool = False,
) -> RunResult:
    """Run ``config`` on Flower's Simulation Engine and return its results.

    ``strategy`` replaces the one named in the config (any :class:`Strategy`,
    including your own subclass; its class is recorded in ``strategy.json`` next to
    ``config.toml``); ``client_app`` replaces fedelta's ClientApp, for instance with
    one that wraps it to misbehave in a robustness experiment. ``nested`` shows the
    round bar under an experiment's bar, without the closing table; ``report``
    writes the run's plots and ``report.html``.
    """
    from flwr.simulation import run_simulation  # imports Ray: keep it off import paths

    run_dir = run_dir_for(config)
    config = config.replace(output_dir=str(run_dir))
    preflight(config)
    record_strategy(run_dir, strategy, config.resume)
    # Ray workers inherit the environment: no tokenizer thread pools behind their forks.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.ERROR)
    # Ray never schedules a client that asks for more cores than the machine has.
    client_cpus = min(config.simulation.client_cpus, float(os.cpu_count() or 1))
    backend_config = {
        "client_resources": {"num_cpus": client_cpus, "num_gpus": 0.0},
        "init_args": {"logging_level": "ERROR", "log_to_driver": verbose},
    }
    errors: list[Exception] = []
    with PeakMemory() as memory:
        run_simulation(
            server_app=make_server_app(
                config, strategy, progress=progress, nested=nested, errors=errors
            ),
            client_app=client_app or fedelta_client_app,
            num_supernodes=config.simulation.num_supernodes,
            backend_config=backend_config,
            verbose_logging=verbose,
        )
    if errors:
        raise errors[0]
    summary_path = run_dir / SUMMARY_FILE
    if not summary_path.is_file():
        raise RuntimeError(
            f"the simulation ended without writing {summary_path}; see the log above"
        )
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    summary["peak-rss-mb"] = round(memory.peak_bytes / 2**20, 1)
    write_summary(run_dir, summary)
    result = RunResult.load(run_dir)
    if report:
        write_run_report(result)
    return result
