"""The ``fedelta`` command line: simulate, resume, experiment grids and reports,
export, the centralised baseline, merging and delta transfer, and the commands that
stand up a secured multi-site deployment."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import warnings
from pathlib import Path

from fedelta import __version__
from fedelta.config import RUN_CONFIG_FILE, ConfigError, RunConfig, load_config
from fedelta.deployment import commands as deployment
from fedelta.errors import UserError

# Commands import what they use when they run: `fedelta certs` or `fedelta --help`
# should not pay seconds of torch, transformers and Ray imports.


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _configure_logging()
    try:
        return int(args.command(args) or 0)
    except UserError as err:  # caused by the input: one line, no traceback
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
    sim.add_argument(
        "--init-from",
        type=Path,
        metavar="DIR",
        help="start from this model folder (e.g. `fedelta transfer` output) or merged "
        "adapter instead of model.name",
    )
    _add_set(sim)
    sim.add_argument("--verbose", action="store_true", help="show Flower and Ray logs")
    sim.add_argument("--no-progress", action="store_true", help="no progress bar or table")
    sim.set_defaults(command=_simulate)

    grid = sub.add_parser(
        "experiment",
        help="run every combination of an experiment file's variants, grid and seeds "
        "(resumable) and compare them",
    )
    grid.add_argument("file", type=Path, metavar="FILE.toml", help="the experiment file")
    grid.add_argument(
        "--out",
        type=Path,
        help="output dir (default: outputs/<experiment name>); run the "
        "same command again to resume",
    )
    grid.add_argument(
        "--engine",
        choices=["simulation", "in-process"],
        help="what runs each cell (default: the file's [experiment] engine, else "
        "simulation): Flower's Simulation Engine, or the same rounds in one process "
        "without Ray (faster; no federated evaluation or secure aggregation). Start the "
        "command in several shells to run cells side by side",
    )
    _add_set(grid, "override a key of the base config, for every run (repeatable)")
    grid.add_argument("--verbose", action="store_true", help="show Flower and Ray logs")
    grid.add_argument("--no-progress", action="store_true", help="no progress bars")
    grid.set_defaults(command=_experiment)

    rep = sub.add_parser(
        "report", help="(re)write the plots and report.html of a run or an experiment folder"
    )
    rep.add_argument("folder", type=Path, metavar="RUN_OR_EXPERIMENT_DIR")
    rep.set_defaults(command=_report)

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

    merge = sub.add_parser(
        "merge", help="merge saved adapters or delta files (TIES, DARE, task arithmetic, ...)"
    )
    merge.add_argument("inputs", type=Path, nargs="+", metavar="INPUT")
    merge.add_argument("--method", required=True, help="task-arithmetic, ties, dare-linear, ...")
    merge.add_argument("--weights", type=float, nargs="+", help="one per input")
    merge.add_argument("--density", type=float, default=1.0, help="share of entries kept")
    merge.add_argument("--seed", type=int, default=0, help="DARE's random drops")
    merge.add_argument(
        "--lora-mode",
        choices=("product", "factors"),
        default="product",
        help="adapters: merge each module's B@A into a model folder, or A and B separately",
    )
    merge.add_argument("--out", type=Path, required=True)
    merge.set_defaults(command=_merge)

    tra = sub.add_parser(
        "transfer", help="apply a delta learned on one base-model version to another"
    )
    tra.add_argument("--delta", type=Path, required=True, metavar="RUN_OR_ADAPTER")
    tra.add_argument("--from", dest="base_from", required=True, metavar="BASE_V1")
    tra.add_argument("--to", dest="base_to", required=True, metavar="BASE_V2")
    tra.add_argument("--out", type=Path, required=True)
    tra.set_defaults(command=_transfer)
    _add_deployment_commands(sub)
    return parser


def _add_deployment_commands(sub: argparse._SubParsersAction) -> None:
    """certs, partition, superlink, supernode, connect, register: a secured deployment."""
    certs = sub.add_parser(
        "certs", help="write a CA, the SuperLink's TLS certificate and one key pair per site"
    )
    certs.add_argument("--out", type=Path, required=True, help="folder to write into")
    certs.add_argument(
        "--superlink-host",
        required=True,
        help="DNS name or IP the sites use to reach the SuperLink (goes into the certificate)",
    )
    certs.add_argument("--supernodes", type=int, default=2, help="sites site-0 .. site-(N-1)")
    certs.add_argument("--names", help="comma-separated site names instead of site-<i>")
    certs.add_argument("--valid-days", type=int, default=365)
    certs.add_argument("--force", action="store_true", help="overwrite existing files")
    certs.set_defaults(command=_certs)

    part = sub.add_parser(
        "partition", help="write each site's partition as a data file (rehearse a deployment)"
    )
    part.add_argument("--config", type=Path)
    _add_set(part)
    part.add_argument("--num-partitions", type=int, required=True)
    part.add_argument("--out", type=Path, required=True, help="writes OUT/site-<i>/train.csv")
    part.set_defaults(command=_partition)

    link = sub.add_parser("superlink", help="start the SuperLink (TLS, registered sites only)")
    link.add_argument("--certs", type=Path, help="the superlink/ folder from fedelta certs")
    link.add_argument("--fleet-api-address", default=deployment.FLEET_API_ADDRESS)
    link.add_argument("--control-api-address", default=deployment.CONTROL_API_ADDRESS)
    link.add_argument("--database", help="SQLite file: keeps registered sites across restarts")
    link.add_argument("--insecure", action="store_true", help="no TLS, no node auth (warns)")
    link.add_argument("--dry-run", action="store_true", help="print the command, start nothing")
    link.set_defaults(command=_superlink)

    node = sub.add_parser("supernode", help="start one site's SuperNode")
    node.add_argument("--certs", type=Path, help="the supernodes/<site>/ folder from fedelta certs")
    node.add_argument("--superlink", required=True, help="the SuperLink's Fleet API, HOST:9092")
    node.add_argument("--data-path", default="", help="this site's data file")
    node.add_argument("--partition-id", type=int, help="rehearsal: train on this partition")
    node.add_argument("--num-partitions", type=int)
    node.add_argument("--site-name", default="", help="default: the --certs folder's name")
    node.add_argument("--lora-r", type=int, default=0, help="this site's LoRA rank")
    node.add_argument(
        "--runtime-port",
        type=int,
        default=deployment.CLIENTAPP_RUNTIME_PORT,
        help="loopback port for this SuperNode's ClientApps (distinct per SuperNode on a host)",
    )
    node.add_argument(
        "--max-wait-time",
        type=float,
        help="give up after this many seconds without reaching the SuperLink (default: never)",
    )
    node.add_argument("--insecure", action="store_true", help="no TLS, no node auth (warns)")
    node.add_argument("--dry-run", action="store_true", help="print the command, start nothing")
    node.set_defaults(command=_supernode)

    conn = sub.add_parser(
        "connect", help="add a SuperLink connection to Flower's CLI config (flwr run . NAME)"
    )
    conn.add_argument("name", help="connection name, used as `flwr run . NAME`")
    conn.add_argument("--address", required=True, help="the SuperLink's Control API, HOST:9093")
    conn.add_argument("--ca", type=Path, help="the federation's ca.crt")
    conn.add_argument("--insecure", action="store_true", help="no TLS (warns)")
    conn.set_defaults(command=_connect)

    reg = sub.add_parser("register", help="register the sites' public keys with the SuperLink")
    reg.add_argument("name", help="the connection name given to fedelta connect")
    reg.add_argument("--certs", type=Path, required=True, help="the folder fedelta certs wrote")
    reg.add_argument("--sites", help="comma-separated sites (default: every site under --certs)")
    reg.set_defaults(command=_register)


def _add_set(
    parser: argparse.ArgumentParser, help: str = "override a config key (repeatable)"
) -> None:
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help
    )


def _simulate(args: argparse.Namespace) -> int:
    from fedelta.simulations import simulate

    if args.resume:
        if args.config or args.out:
            raise ConfigError("--resume continues RUN_DIR with its own config; drop --config/--out")
        config = load_config(args.resume / RUN_CONFIG_FILE, args.overrides, follow_renames=True)
        config = config.replace(resume=True, output_dir=str(args.resume))
    else:
        config = load_config(args.config, args.overrides)
        if args.out:
            config = config.replace(output_dir=str(args.out))
        if args.init_from:
            from fedelta.compatibility import check_config
            from fedelta.server.app import run_dir_for

            check_config(config)  # before the merged model is written
            config = config.replace(output_dir=str(run_dir_for(config)))
            config = config.replace(**{"model.name": str(_init_model(args.init_from, config))})
    from fedelta.server.generations import GENERATIONS_FILE
    from fedelta.server.metrics import format_traffic
    from fedelta.simulations.report import REPORT_FILE

    result = simulate(config, progress=not args.no_progress, verbose=args.verbose)
    print(json.dumps(result.summary, indent=2))
    print(format_traffic(result.summary))
    print(f"report: {result.run_dir / REPORT_FILE}")
    if "generations" in result.summary:
        print(f"sample answers before and after: {result.run_dir / GENERATIONS_FILE}")
    return 0


def _experiment(args: argparse.Namespace) -> int:
    from fedelta.simulations import Experiment, run_experiment

    experiment = Experiment.from_toml(args.file, args.overrides)
    if args.engine:
        experiment.engine = args.engine
    out = args.out or Path("outputs") / experiment.name
    done = run_experiment(experiment, out, progress=not args.no_progress, verbose=args.verbose)
    print(done.table)
    print(f"ran {len(done.ran)}, already finished {len(done.skipped)}; report: {done.report}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from fedelta.simulations import Experiment, RunResult, write_run_report
    from fedelta.simulations.experiment import SPEC_FILE, write_experiment_report
    from fedelta.simulations.report import REPORT_FILE

    if (args.folder / SPEC_FILE).is_file():
        write_experiment_report(Experiment.from_toml(args.folder / SPEC_FILE), args.folder)
        print(args.folder / REPORT_FILE)
    else:
        print(write_run_report(RunResult.load(args.folder)))
    return 0


def _init_model(source: Path, config: RunConfig) -> Path:
    """The model folder a federation starts from: ``source`` itself, or an exported
    adapter merged into its base (written next to the run)."""
    from fedelta.merging.task_vectors import is_adapter
    from fedelta.server.export import export_merged

    if is_adapter(source):
        return export_merged(source, Path(config.output_dir) / "init-model")
    if not (source / "config.json").is_file():
        raise ConfigError(
            f"--init-from '{source}' is neither a model folder (config.json) nor an "
            "exported adapter (adapter_config.json)"
        )
    return source


def _merge(args: argparse.Namespace) -> int:
    from fedelta.merging.saved import merge_saved

    out = merge_saved(
        args.inputs,
        args.out,
        args.method,
        weights=args.weights,
        density=args.density,
        seed=args.seed,
        lora_mode=args.lora_mode,
    )
    print(f"merged {len(args.inputs)} inputs with {args.method}: {out}")
    return 0


def _transfer(args: argparse.Namespace) -> int:
    from fedelta.merging.transfer import format_shifts, transfer

    report = transfer(args.delta, args.base_from, args.base_to, args.out)
    print(format_shifts(report))
    print(f"transferred model: {args.out} (diagnostic: {args.out / 'transfer.json'})")
    return 0


def _export(args: argparse.Namespace) -> int:
    from fedelta.server.checkpoint import CheckpointError
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
    from fedelta.strategies.capabilities import (
        MEANINGS,
        capability_matrix,
        format_matrix,
        format_optimizer_matrix,
        optimizer_matrix,
    )

    rows = capability_matrix()
    if args.json:
        print(
            json.dumps(
                {
                    "rules": rows,
                    "optimizers": sorted(OPTIMIZERS),
                    "optimizer-matrix": optimizer_matrix(),
                },
                indent=2,
            )
        )
        return 0
    print(format_matrix(rows))
    print("\n" + "\n".join(f"{key}: {meaning}" for key, meaning in MEANINGS.items()))
    print(
        "\nA combined strategy has a property only if its LoRA rule and its aggregator "
        "both do;\nserver-side norm bounding (strategy.clip-norm) rules out secure "
        f"aggregation.\nServer optimizers (strategy.optimizer): {', '.join(OPTIMIZERS)}; "
        "they step the combined update and change none of the above, except that those "
        "reading each reply rule out secure aggregation:\n"
    )
    print(format_optimizer_matrix(optimizer_matrix()))
    return 0


def _centralised(args: argparse.Namespace) -> int:
    from fedelta.compatibility import check_config
    from fedelta.simulations.centralised import federated_step_budget, train_centralised

    config: RunConfig = load_config(args.config, args.overrides)
    check_config(config)
    steps = args.steps or federated_step_budget(config)
    print(f"centralised baseline: {steps} steps, lr {config.lr}, batch {config.batch_size}")
    rows = train_centralised(
        config, steps, args.eval_every, on_eval=lambda row: print(json.dumps(row), flush=True)
    )
    if args.out:
        args.out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return 0


def _certs(args: argparse.Namespace) -> int:
    from fedelta.deployment.certs import generate_certs, site_names

    names = [n.strip() for n in args.names.split(",")] if args.names else ()
    written = generate_certs(
        args.out,
        args.superlink_host,
        site_names(args.supernodes, names),
        force=args.force,
        valid_days=args.valid_days,
    )
    print(f"CA:        {written.ca_cert}  (keep {written.root / 'ca.key'} offline)")
    print(f"SuperLink: {written.superlink}/  (for host {args.superlink_host})")
    for site in written.sites:
        print(f"{site + ':':<10} {written.site(site)}/  (send this folder to the site)")
    return 0


def _partition(args: argparse.Namespace) -> int:
    from fedelta.compatibility import check_config
    from fedelta.data import write_site_files

    config = load_config(args.config, args.overrides)
    check_config(config)
    if args.num_partitions < 1:
        raise ConfigError("--num-partitions must be >= 1")
    for path in write_site_files(config.data, config.seed, args.num_partitions, args.out):
        print(path)
    return 0


def _superlink(args: argparse.Namespace) -> int:
    if args.database and not args.dry_run:
        Path(args.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    command = deployment.superlink_command(
        args.certs,
        fleet_api_address=args.fleet_api_address,
        control_api_address=args.control_api_address,
        database=args.database,
        insecure=args.insecure,
    )
    return _exec(command, args.dry_run)


def _supernode(args: argparse.Namespace) -> int:
    data = deployment.SiteData(args.data_path, args.partition_id, args.num_partitions)
    command = deployment.supernode_command(
        args.certs,
        args.superlink,
        data,
        site_name=args.site_name,
        lora_r=args.lora_r,
        runtime_port=args.runtime_port,
        max_wait_time=args.max_wait_time,
        insecure=args.insecure,
    )
    return _exec(command, args.dry_run)


def _exec(command: list[str], dry_run: bool) -> int:
    """Print the Flower command, then become it (same pid: signals reach Flower)."""
    print(shlex.join(command), flush=True)
    if dry_run:
        return 0
    binary, env = deployment.flower_binary(command[0])
    os.execve(binary, command, env)


def _connect(args: argparse.Namespace) -> int:
    deployment.connect(args.name, args.address, args.ca, insecure=args.insecure)
    print(f"SuperLink connection {args.name!r} -> {args.address}; now: flwr run . {args.name}")
    return 0


def _register(args: argparse.Namespace) -> int:
    sites = [s.strip() for s in args.sites.split(",")] if args.sites else ()
    keys = deployment.site_public_keys(args.certs, sites)
    for site, outcome in deployment.register(args.name, keys).items():
        print(f"{site}: {outcome}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
