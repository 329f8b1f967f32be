"""Experiment grids: every combination of the listed options, repeated over seeds,
resumable, summarised in one comparison table and report.

An experiment file is a run config (the settings every run shares) with three more
tables::

    [experiment]
    name = "compare-strategies"
    config = "default.toml"        # optional base config, relative to this file
    seeds = [0, 1]
    engine = "in-process"          # optional: "simulation" (Flower, the default)

    [variants.fedavg]              # named arms, each a set of overrides
    [variants.fedadam]
    strategy.optimizer = "fedadam"

    [grid]                         # crossed with every variant
    lr = [0.001, 0.002]

Each run lives in ``OUT/runs/<variant>__<key=value>__seed=<s>/`` with its own config,
metrics, checkpoints, adapter and report. Running the same experiment into the same
folder again skips finished runs and resumes an interrupted one from its last
checkpoint. Several processes (or machines sharing the folder) can run the same
experiment at once: each run is claimed by the process training it, and the others
take the next one.

``engine`` says what runs each cell: ``"simulation"``, Flower's Simulation Engine
(:func:`~fedelta.simulations.simulate`), or ``"in-process"``, the same sites, round and
strategy in one process without Ray (:func:`~fedelta.simulations.in_process.run_in_process`:
faster, no federated evaluation or secure aggregation).
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import itertools
import json
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from fedelta.compatibility import check_config
from fedelta.config import (
    RUN_CONFIG_FILE,
    ConfigError,
    RunConfig,
    flatten_mapping,
    load_config,
    parse_overrides,
    read_toml,
)
from fedelta.data import DataError
from fedelta.server.checkpoint import FILENAME as CHECKPOINT_FILE
from fedelta.server.metrics import SUMMARY_FILE
from fedelta.server.run_folder import config_changes
from fedelta.simulations.comparison import Arm, to_markdown
from fedelta.simulations.in_process import run_in_process
from fedelta.simulations.preflight import check_partitioning
from fedelta.simulations.report import REPORT_FILE, write_comparison_report
from fedelta.simulations.results import RunResult, class_path, recorded_strategy
from fedelta.simulations.simulate import simulate
from fedelta.strategies import Strategy

SPEC_FILE = "experiment.toml"
RUNS_DIR = "runs"
CLAIM_FILE = ".claim"
"""Locked by the process training a run, so that concurrent processes skip it."""
ENGINES = ("simulation", "in-process")
StrategySource = Strategy | Callable[[RunConfig], Strategy]
"""A strategy object (copied fresh for every run) or a function of the run's config."""
_EXPERIMENT_TABLES = ("experiment", "variants", "grid")
_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]+")


@dataclass
class Variant:
    """One named arm: config overrides, and optionally a strategy object of your own."""

    overrides: dict[str, Any] = field(default_factory=dict)
    strategy: StrategySource | None = None


@dataclass(frozen=True)
class PlannedRun:
    """One cell of the grid for one seed."""

    arm: str
    settings: dict[str, Any]
    seed: int
    config: RunConfig
    strategy: StrategySource | None
    dirname: str

    def build_strategy(self, config: RunConfig) -> Strategy | None:
        if self.strategy is None:
            return None
        return _as_plan_strategy(self.strategy, config)


@dataclass
class Experiment:
    """Variants x grid x seeds over a shared base config."""

    name: str
    base: RunConfig = field(default_factory=RunConfig)
    variants: Mapping[str, Variant | Mapping[str, Any]] = field(default_factory=dict)
    """Named arms; a plain mapping is a set of config overrides."""
    grid: Mapping[str, Sequence[Any]] = field(default_factory=dict)
    """Config keys to lists of values; every combination is run for every variant."""
    seeds: Sequence[int] = ()
    """Repeats of every arm (``seed`` of the run config); default: the base seed."""
    engine: str = "simulation"
    """What runs each cell: ``"simulation"`` (Flower) or ``"in-process"``."""

    @classmethod
    def from_toml(cls, path: str | Path, overrides: Iterable[str] = ()) -> Experiment:
        """Read an experiment file; ``overrides`` (``key=value``) change the base config."""
        path = Path(path)
        raw = read_toml(path)
        meta = raw.get("experiment", {})
        unknown = sorted(set(meta) - {"name", "config", "seeds", "engine"})
        if unknown:
            raise ConfigError(
                f"{path}: unknown [experiment] keys {unknown} (name, config, seeds, engine)"
            )
        flat = flatten_mapping({k: v for k, v in raw.items() if k not in _EXPERIMENT_TABLES})
        if "config" in meta:
            base_path = path.parent / meta["config"]
            base = load_config(base_path).to_flat() | flat
        else:
            base = flat
        try:
            config = RunConfig.from_flat(base | parse_overrides(overrides))
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from err
        variants = raw.get("variants", {})
        for name, table in variants.items():
            if not isinstance(table, Mapping):
                raise ConfigError(f"{path}: [variants.{name}] must be a table of config keys")
        return cls(
            name=str(meta.get("name", path.stem)),
            base=config,
            variants={name: flatten_mapping(table) for name, table in variants.items()},
            grid=flatten_mapping(raw.get("grid", {})),
            seeds=meta.get("seeds", ()),
            engine=meta.get("engine", "simulation"),
        )

    def planned_runs(self) -> list[PlannedRun]:
        """Every run, each config built and validated (a bad cell stops the experiment
        before anything trains)."""
        self._check()
        seeds = list(self.seeds) or [self.base.seed]
        variants = {name: _as_variant(v) for name, v in self.variants.items()} or {"": Variant()}
        keys = list(self.grid)
        plans = []
        for (name, variant), values in itertools.product(
            variants.items(), itertools.product(*(self.grid[k] for k in keys))
        ):
            cell = dict(zip(keys, values, strict=True))
            parts = ([name] if name else []) + [f"{k}={v}" for k, v in cell.items()]
            where = f"variant '{name}'" if name else "the base config"
            if cell:
                where += f" with {cell}"
            for seed in seeds:
                try:
                    config = self.base.replace(**(variant.overrides | cell | {"seed": seed}))
                    check_config(config)
                except ConfigError as err:
                    raise ConfigError(f"experiment '{self.name}', {where}: {err}") from err
                plans.append(
                    PlannedRun(
                        arm=", ".join(parts) or self.name,
                        settings=({"variant": name} if name else {}) | cell,
                        seed=seed,
                        config=config,
                        strategy=variant.strategy,
                        dirname=_UNSAFE.sub("-", "__".join([*parts, f"seed={seed}"])),
                    )
                )
        return plans

    def to_toml(self) -> str:
        """The experiment as a file ``fedelta experiment`` can run again (strategy
        objects are recorded by class only: they are code, not config)."""
        lines = ["[experiment]", f"name = {json.dumps(self.name)}"]
        lines.append(f"seeds = {list(self.seeds) or [self.base.seed]}")
        lines.append(f"engine = {json.dumps(self.engine)}")
        if self.grid:
            lines += ["", "[grid]"]
            lines += [f"{json.dumps(k)} = {_toml_list(v)}" for k, v in self.grid.items()]
        for name, v in self.variants.items():
            variant = _as_variant(v)
            lines += ["", f"[variants.{json.dumps(name)}]"]
            lines += [f"{json.dumps(k)} = {_toml(val)}" for k, val in variant.overrides.items()]
            if (source := variant.strategy) is not None:
                if isinstance(source, Strategy):
                    lines.append(f"# strategy object: {class_path(source)}")
                else:
                    lines.append(f"# strategy from: {source.__module__}.{source.__qualname__}")
        return self.base.to_toml() + "\n" + "\n".join(lines) + "\n"

    def _check(self) -> None:
        if self.engine not in ENGINES:
            raise ConfigError(
                f"experiment engine {self.engine!r} is not one of {', '.join(ENGINES)}"
            )
        if not self.name or _UNSAFE.search(self.name):
            raise ConfigError(
                f"experiment name {self.name!r} must be letters, digits and . _ = + - only"
            )
        for name in self.variants:
            if not name or _UNSAFE.search(name):
                raise ConfigError(
                    f"variant name {name!r} must be letters, digits and . _ = + - only"
                )
        for key, values in self.grid.items():
            if isinstance(values, str | bytes) or not isinstance(values, Sequence) or not values:
                raise ConfigError(f"grid key '{key}' needs a non-empty list of values")
        if (
            isinstance(self.seeds, str)
            or not isinstance(self.seeds, Sequence)
            or any(isinstance(s, bool) or not isinstance(s, int) for s in self.seeds)
        ):
            raise ConfigError(f"experiment seeds must be a list of integers, got {self.seeds!r}")
        if len(set(self.seeds)) != len(list(self.seeds)):
            raise ConfigError(f"experiment seeds repeat: {list(self.seeds)}")


@dataclass(frozen=True)
class ExperimentResult:
    """The finished grid: its arms (runs grouped over seeds) and where it wrote them."""

    out_dir: Path
    arms: list[Arm]
    ran: list[str]
    """Runs trained (or resumed) by this call."""
    skipped: list[str]
    """Runs already finished in ``out_dir``, read back instead of re-run."""

    @property
    def report(self) -> Path:
        return self.out_dir / REPORT_FILE

    @property
    def table(self) -> str:
        """The comparison as markdown (also ``results.md``)."""
        return to_markdown(self.arms)


def run_experiment(
    experiment: Experiment,
    out_dir: str | Path,
    *,
    progress: bool = True,
    verbose: bool = False,
) -> ExperimentResult:
    """Run every planned run not yet finished in ``out_dir``, then write the
    comparison (``results.csv``, ``results.md``, ``runs.csv``, plots, ``report.html``)."""
    out_dir = Path(out_dir)
    plans = experiment.planned_runs()
    # Every folder is checked before anything trains: a changed experiment stops here.
    finished = {plan.dirname: _finished(out_dir / RUNS_DIR / plan.dirname, plan) for plan in plans}
    for plan in plans:  # so does a seed whose partition cannot be drawn
        if not finished[plan.dirname]:
            try:
                check_partitioning(plan.config)
            except DataError as err:
                where = f"experiment '{experiment.name}', run {plan.dirname}"
                raise DataError(f"{where}: {err}") from err
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / SPEC_FILE).write_text(experiment.to_toml(), encoding="utf-8")
    ran, skipped, elsewhere = [], [], []
    bar = tqdm(total=len(plans), desc=experiment.name, unit="run", disable=not progress)
    for plan in plans:
        run_dir = out_dir / RUNS_DIR / plan.dirname
        if finished[plan.dirname]:
            skipped.append(plan.dirname)
        else:
            with _claim(run_dir) as claimed:
                if not claimed:
                    elsewhere.append(plan.dirname)
                elif _finished(run_dir, plan):  # finished by another process meanwhile
                    skipped.append(plan.dirname)
                else:
                    bar.set_postfix_str(plan.dirname, refresh=True)
                    _run(experiment.engine, plan, run_dir, progress, verbose)
                    ran.append(plan.dirname)
        bar.update(1)
    bar.close()
    if skipped and progress:
        print(f"{len(skipped)} finished run(s) in {out_dir} were not re-run", file=sys.stderr)
    if elsewhere and progress:
        print(
            f"{len(elsewhere)} run(s) were being trained by another process and are left "
            "out of this report; run the experiment again when they finish",
            file=sys.stderr,
        )
    return ExperimentResult(out_dir, write_experiment_report(experiment, out_dir), ran, skipped)


def write_experiment_report(experiment: Experiment, out_dir: str | Path) -> list[Arm]:
    """Compare the experiment's finished runs in ``out_dir`` (tables, plots,
    ``report.html``); returns them as arms. Runs not finished yet are left out."""
    out_dir = Path(out_dir)
    results: dict[str, list[RunResult]] = {}
    settings: dict[str, dict[str, Any]] = {}
    for plan in experiment.planned_runs():
        run_dir = out_dir / RUNS_DIR / plan.dirname
        if (run_dir / SUMMARY_FILE).is_file():
            results.setdefault(plan.arm, []).append(RunResult.load(run_dir))
            settings[plan.arm] = plan.settings
    if not results:
        raise ConfigError(f"'{out_dir}' holds no finished run of experiment '{experiment.name}'")
    arms = [Arm(label, runs, settings[label]) for label, runs in results.items()]
    write_comparison_report(f"Experiment {experiment.name}", arms, out_dir, experiment.to_toml())
    return arms


def _run(engine: str, plan: PlannedRun, run_dir: Path, progress: bool, verbose: bool) -> None:
    """Train (or resume) one planned run into ``run_dir`` with ``engine``."""
    config = plan.config.replace(
        **{"output-dir": str(run_dir), "resume": (run_dir / CHECKPOINT_FILE).exists()}
    )
    strategy = plan.build_strategy(config)
    if engine == "in-process":
        run_in_process(config, strategy=strategy, progress=progress, nested=True)
    else:
        simulate(config, strategy=strategy, progress=progress, nested=True, verbose=verbose)


@contextlib.contextmanager
def _claim(run_dir: Path) -> Iterator[bool]:
    """Hold ``run_dir``'s claim while the body runs; ``False``: another process holds
    it. The lock goes with the process, so a killed run leaves no stale claim."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / CLAIM_FILE, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _finished(run_dir: Path, plan: PlannedRun) -> bool:
    """Whether the run finished with this plan's config and strategy (``False``: it has
    yet to run or to finish); refuses a folder that holds a different run (the
    experiment changed under it)."""
    if not (run_dir / RUN_CONFIG_FILE).is_file():
        return False
    changed = config_changes(run_dir, plan.config)
    made_by = recorded_strategy(run_dir)
    strategy = plan.build_strategy(plan.config)
    if made_by != (class_path(strategy) if strategy is not None else None):
        changed.append(f"the strategy object ({made_by or 'none'})")
    if changed:
        raise ConfigError(
            f"'{run_dir}' holds a run with a different setup ({', '.join(changed)} changed); "
            "write the experiment to a new folder or delete that run"
        )
    if not (run_dir / SUMMARY_FILE).is_file():
        return False  # interrupted: resumed from its checkpoint
    summary = RunResult.load(run_dir).summary
    # A run that ended early (privacy budgets spent) is finished; otherwise a grown
    # num-server-rounds continues it from its last round.
    return summary["rounds"] >= plan.config.num_server_rounds or "stopped-early" in summary


def _as_plan_strategy(source: StrategySource, config: RunConfig) -> Strategy:
    if isinstance(source, Strategy):
        return copy.deepcopy(source)  # every run starts from a fresh state
    return source(config)


def _as_variant(value: Variant | Mapping[str, Any]) -> Variant:
    return value if isinstance(value, Variant) else Variant(dict(value))


def _toml(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, bool) else str(value).lower()


def _toml_list(values: Sequence[Any]) -> str:
    return "[" + ", ".join(_toml(v) for v in values) + "]"
