"""fedelta's ServerApp (Flower Message API), for ``flwr run`` and ``fedelta simulate``."""

from __future__ import annotations

import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedelta.config import RunConfig
from fedelta.server.federation import Federation
from fedelta.strategies import Strategy


def run_dir_for(config: RunConfig) -> Path:
    """``output-dir``, or a fresh ``outputs/<timestamp>`` when it is empty."""
    if config.output_dir:
        return Path(config.output_dir).expanduser()
    return Path("outputs") / time.strftime("%Y-%m-%d_%H-%M-%S")


def make_server_app(
    config: RunConfig,
    strategy: Strategy | None = None,
    *,
    progress: bool = True,
    nested: bool = False,
    errors: list[Exception] | None = None,
) -> ServerApp:
    """A ServerApp bound to ``config`` (and optionally a strategy object) from Python.

    ``errors`` collects what stopped the run: Flower's simulation logs a ServerApp's
    exception and returns, so the caller re-raises it from there."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            Federation(
                grid,
                config,
                run_dir_for(config),
                strategy=strategy,
                resume=config.resume,
                progress=progress,
                nested=nested,
            ).run()
        except Exception as err:
            if errors is not None:
                errors.append(err)
            raise

    return server_app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run``: the run config comes from pyproject/--run-config."""
    config = RunConfig.from_flat(context.run_config)
    Federation(grid, config, run_dir_for(config), resume=config.resume, progress=False).run()
