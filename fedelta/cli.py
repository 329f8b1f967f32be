"""The ``fedelta`` command line: simulate, resume, export, and the centralised baseline."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from fedelta import __version__
from fedelta.assets import AssetNotInstalledError
from fedelta.config import RUN_CONFIG_FILE, ConfigError, RunConfig, load_config
from fedelta.data import DataError
from fedelta.models import ModelNotFoundError
from fedelta.protocol import NodeConfigError
from fedelta.server.checkpoint import CheckpointError

USER_ERRORS = (
    ConfigError,
    DataError,
    AssetNotInstalledError,
    ModelNotFoundError,
    CheckpointError,
    NodeConfigError,
)
"""Errors caused by what the user asked for: printed as one line, no traceback."""


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _configure_logging()
    try:
        return int(args.command(args) or 0)
    except USER_ERRORS as err:
        print(f"fedelta: error: {err}", file=sys.stderr)
        return 2


def _configure_logging() -> None:
    """fedelta's own INFO lines; libraries only when they warn about this run."""
    # Deprecation notices from transformers/peft/Ray internals say nothing about the
    # user's run; Ray workers inherit the environment, so silence them there too.
    warnings.simplefilter("ignore", FutureWarning)
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    logger = logging.getLogger("fedelta")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedelta", description="Federated fine-tuning of language models on Flower."
    )
    parser.add_argument("--version", action="version", version=f"fedelta {__version__}")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    sim = sub.add_parser("simulate", help="run a federation on this machine (Flower simulation)")
    sim.add_argument("--config", type=Path, help="TOML run config (defaults if omitted)")
    sim.add_argument("--out", type=Path, help="output dir (default: outputs/<timestamp>)")
    sim.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue RUN_DIR from its last completed round",
    )
    _add_set(sim)
    sim.add_argument("--verbose", action="store_true", help="show Flower and Ray logs")
    sim.add_argument("--no-progress", action="store_true", help="no progress bar or table")
    sim.set_defaults(command=_simulate)

    exp = sub.add_parser(
        "export", help="write a run's adapter from its last checkpoint (and a merged model)"
    )
    exp.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    exp.add_argument(
        "--merged", action="store_true", help="also write the adapter merged into the base model"
    )
    exp.add_argument(
        "--out", type=Path, help="where the merged model goes (default RUN_DIR/merged)"
    )
    exp.set_defaults(command=_export)

    strat = sub.add_parser(
        "strategies", help="list the aggregation strategies and what each guarantees"
    )
    strat.add_argument("--json", action="store_true", help="print the matrix as JSON")
    strat.set_defaults(command=_strategies)

    cen = sub.add_parser("centralised", help="train the same adapter on pooled data (baseline)")
    cen.add_argument("--config", type=Path)
    _add_set(cen)
    cen.add_argument("--steps", type=int, help="total steps (default: the federation's budget)")
    cen.add_argument("--eval-every", type=int, default=100)
    cen.add_argument("--out", type=Path, help="write the rows as JSON lines here")
    cen.set_defaults(command=_centralised)
    return parser


def _add_set(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (repeatable)",
    )


def _simulate(args: argparse.Namespace) -> int:
    from fedelta.simulations import simulate

    if args.resume:
        if args.config or args.out:
            raise ConfigError("--resume continues RUN_DIR with its own config; drop --config/--out")
        config = load_config(args.resume / RUN_CONFIG_FILE, args.overrides)
        config = config.replace(resume=True, output_dir=str(args.resume))
    else:
        config = load_config(args.config, args.overrides)
        if args.out:
            config = config.replace(output_dir=str(args.out))
    result = simulate(config, progress=not args.no_progress, verbose=args.verbose)
    print(json.dumps(result.summary, indent=2))
    return 0


def _export(args: argparse.Namespace) -> int:
    from fedelta.server.export import MERGED_DIR, export_checkpoint, export_merged

    if not (args.run_dir / RUN_CONFIG_FILE).is_file():
        raise CheckpointError(f"'{args.run_dir}' is not a run directory (no {RUN_CONFIG_FILE})")
    adapter = export_checkpoint(args.run_dir)
    print(f"adapter: {adapter}")
    if args.merged:
        out = export_merged(adapter, args.out or args.run_dir / MERGED_DIR)
        print(f"merged model: {out}")
    return 0


def _strategies(args: argparse.Namespace) -> int:
    from fedelta.strategies import OPTIMIZERS
    from fedelta.strategies.capabilities import MEANINGS, capability_matrix, format_matrix

    rows = capability_matrix()
    if args.json:
        print(json.dumps({"rules": rows, "optimizers": sorted(OPTIMIZERS)}, indent=2))
        return 0
    print(format_matrix(rows))
    print("\n" + "\n".join(f"{key}: {meaning}" for key, meaning in MEANINGS.items()))
    print(
        "\nA combined strategy has a property only if its LoRA rule and its combination "
        "rule both do;\nserver-side norm bounding (strategy.clip-norm) rules out secure "
        f"aggregation.\nServer optimizers (strategy.name): {', '.join(OPTIMIZERS)}; "
        "they step the combined update and change none of the above."
    )
    return 0


def _centralised(args: argparse.Namespace) -> int:
    from fedelta.simulations.centralised import federated_step_budget, train_centralised

    config: RunConfig = load_config(args.config, args.overrides)
    steps = args.steps or federated_step_budget(config)
    print(f"centralised baseline: {steps} steps, lr {config.lr}, batch {config.batch_size}")
    rows = train_centralised(
        config, steps, args.eval_every, on_eval=lambda row: print(json.dumps(row), flush=True)
    )
    if args.out:
        args.out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
