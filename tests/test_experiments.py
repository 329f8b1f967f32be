"""Experiment grids, the Python API with a strategy of the user's own, comparison
tables, plots and reports."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
import torch
from PIL import Image

from fedelta.cli import main as cli
from fedelta.config import ConfigError, RunConfig
from fedelta.server.checkpoint import load_checkpoint
from fedelta.simulations import Arm, Experiment, RunResult, Variant, run_experiment
from fedelta.simulations.comparison import formatted, table_rows
from fedelta.strategies import Capabilities, EmptyRoundError, Strategy

EXAMPLES = Path(__file__).parent.parent / "examples"


class DampedMean(Strategy):
    """A strategy written outside fedelta: move the global state ``step`` of the way
    to the clients' weighted mean, and remember what arrived."""

    capabilities = Capabilities(
        exact=False, linear=True, heterogeneous_ranks=False, dp_friendly=False, streaming=True
    )

    def __init__(self, step: float) -> None:
        self.step = step
        self.initial: dict[str, torch.Tensor] = {}
        self.received: list[tuple[dict[str, torch.Tensor], int]] = []
        self.populations: list[int | None] = []

    def initial_state(self, adapter_state: Mapping[str, torch.Tensor]) -> dict:
        self.initial = {k: v.clone() for k, v in adapter_state.items()}
        return dict(adapter_state)

    def begin_round(self, server_round, global_state, ranks: Sequence[int] = (), population=None):
        self._sum: dict[str, torch.Tensor] = {}
        self._weight = 0
        self.populations.append(population)

    def accumulate(self, delta, num_examples, rank=None):
        self.received.append(({k: v.clone() for k, v in delta.items()}, num_examples))
        for key, value in delta.items():
            self._sum[key] = self._sum.get(key, 0) + num_examples * value
        self._weight += num_examples

    def finish_round(self, global_state):
        if not self._weight:
            raise EmptyRoundError("nothing arrived")
        return {
            k: v + self.step * self._sum[k] / self._weight if k in self._sum else v
            for k, v in global_state.items()
        }


# -- planning (no training) ------------------------------------------------------------
def test_variants_cross_the_grid_and_the_seeds():
    experiment = Experiment(
        "grid",
        variants={"fedavg": {}, "ffa": {"strategy.lora": "ffa"}},
        grid={"lr": [0.001, 0.002], "lora.r": [4, 8]},
        seeds=[3, 4],
    )
    plans = experiment.planned_runs()
    assert len(plans) == 2 * 4 * 2
    assert len({p.dirname for p in plans}) == len(plans)
    plan = next(p for p in plans if p.dirname == "ffa__lr=0.002__lora.r=4__seed=4")
    assert plan.arm == "ffa, lr=0.002, lora.r=4"
    assert plan.settings == {"variant": "ffa", "lr": 0.002, "lora.r": 4}
    assert (plan.config.strategy.lora, plan.config.lr, plan.config.lora.r) == ("ffa", 0.002, 4)
    assert plan.config.seed == 4
    # No variants, no seeds: one arm per grid cell, at the base config's seed.
    single = Experiment("lr", grid={"lr": [0.001, 0.002]}).planned_runs()
    assert [(p.arm, p.config.seed) for p in single] == [("lr=0.001", 42), ("lr=0.002", 42)]


def test_the_example_file_plans_what_the_example_script_runs():
    import sys

    sys.path.insert(0, str(EXAMPLES))
    try:
        import compare_strategies as script
    finally:
        sys.path.remove(str(EXAMPLES))
    from fedelta.config import load_config

    from_file = Experiment.from_toml(
        EXAMPLES / "experiments" / "compare-strategies.toml"
    ).planned_runs()
    from_python = Experiment(
        "compare-strategies",
        load_config(script.DEFAULT_CONFIG, script.BASE),
        script.VARIANTS,
        seeds=[42, 0, 1],
    ).planned_runs()
    assert Experiment.from_toml(EXAMPLES / "experiments" / "compare-strategies.toml").engine == (
        script.ENGINE
    )
    assert [(p.dirname, p.config.to_flat()) for p in from_file] == [
        (p.dirname, p.config.to_flat()) for p in from_python
    ]
    arms = {p.arm: p.config for p in from_file}
    assert set(arms) == {
        "default",
        "fedavg",
        "fedadam",
        "scaffold",
        "fednova",
        "ffa-lora",
        "top5-int8",
    }
    assert arms["default"].strategy.optimizer == "fedavgm"
    assert arms["fedadam"].strategy.optimizer == "fedadam"
    assert arms["ffa-lora"].strategy.lora == "ffa"
    assert arms["top5-int8"].compression.sparsity == "top-k"


def test_experiment_file_precedence_and_errors(tmp_path, capsys):
    base = tmp_path / "base.toml"
    base.write_text("lr = 0.003\nlocal-steps = 7\n[lora]\nr = 4\n")
    spec = tmp_path / "exp.toml"
    spec.write_text(
        "local-steps = 5\n"  # the file's own keys override the base file
        '[experiment]\nname = "p"\nconfig = "base.toml"\nseeds = [1]\n'
        "[variants.small]\nlora.r = 2\n[variants.default]\n"
    )
    plans = Experiment.from_toml(spec, ["lr=0.004"]).planned_runs()
    by_arm = {p.arm: p.config for p in plans}
    assert by_arm["small"].lora.r == 2 and by_arm["default"].lora.r == 4
    assert {c.local_steps for c in by_arm.values()} == {5}
    assert {c.lr for c in by_arm.values()} == {0.004}

    spec.write_text('[experiment]\nname = "p"\n[variants.bad]\nlora.rank = 2\n')
    with pytest.raises(ConfigError, match=r"variant 'bad'.*unknown config key 'lora.rank'"):
        Experiment.from_toml(spec).planned_runs()
    assert cli(["experiment", str(spec), "--out", str(tmp_path / "out")]) == 2
    assert "variant 'bad'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing written before the plan is valid

    spec.write_text('[experiment]\nname = "p"\n[grid]\nlr = 0.1\n')
    with pytest.raises(ConfigError, match="grid key 'lr' needs a non-empty list"):
        Experiment.from_toml(spec).planned_runs()
    spec.write_text('[experiment]\nname = "p"\nrepeats = 2\n')
    with pytest.raises(ConfigError, match="unknown \\[experiment\\] keys \\['repeats'\\]"):
        Experiment.from_toml(spec)
    with pytest.raises(ConfigError, match="seeds must be a list of integers, got 3"):
        Experiment("p", seeds=3).planned_runs()
    with pytest.raises(ConfigError, match="variant name 'a b'"):
        Experiment("p", variants={"a b": {}}).planned_runs()


def test_the_table_reports_mean_and_sample_spread_over_seeds(tmp_path):
    config = RunConfig()

    def run(seed: int, accuracy: float, bytes_up: int) -> RunResult:
        summary = {
            "final-test-accuracy": accuracy,
            "best-test-accuracy": accuracy,
            "final-test-loss": 0.5,
            "total-bytes-up": bytes_up,
            "total-bytes-down": 0,
            "wall-seconds": 1.0,
        }
        rows = [{"round": 0, "test-accuracy": 0.5}, {"round": 1, "test-accuracy": accuracy}]
        return RunResult(tmp_path / str(seed), config.replace(seed=seed), summary, rows)

    arms = [Arm("a", [run(0, 0.6, 2_000_000), run(1, 0.8, 4_000_000)]), Arm("b", [run(0, 0.7, 1)])]
    rows = table_rows(arms)
    assert rows[0]["final-test-accuracy-mean"] == pytest.approx(0.7)
    assert rows[0]["final-test-accuracy-std"] == pytest.approx(0.1414213, rel=1e-6)
    assert rows[1]["final-test-accuracy-std"] is None  # one seed: no spread
    header, cells = formatted(arms)
    assert header[:4] == ["arm", "seeds", "final acc", "best acc"]
    assert cells[0][2] == "0.7000 ± 0.1414"
    assert cells[0][header.index("uplink MB")] == "3.00 ± 1.41"
    assert cells[1][2] == "0.7000"
    assert "peak MB" in header and cells[0][header.index("peak MB")] == "-"


# -- real runs -------------------------------------------------------------------------
@pytest.mark.slow
def test_a_grid_runs_compares_and_resumes_with_a_strategy_of_your_own(
    tiny_config, tmp_path, capsys
):
    """2 arms (FedAvg from config, a user's Strategy subclass) x 2 seeds on Flower's
    Simulation Engine: the table, plots and reports, the subclass doing the
    aggregation, and a second call that skips the finished run and resumes the
    interrupted one."""
    built: list[DampedMean] = []

    def damped(config: RunConfig) -> DampedMean:
        built.append(DampedMean(0.5))
        return built[-1]

    base = tiny_config.replace(**{"local-steps": 1, "output-dir": ""})
    variants = {"fedavg": {}, "damped": Variant(strategy=damped)}
    out = tmp_path / "grid"

    first = run_experiment(Experiment("tiny", base, variants, seeds=[0]), out)
    assert first.ran == ["fedavg__seed=0", "damped__seed=0"] and first.skipped == []
    assert "tiny: 100%" in capsys.readouterr().err  # the experiment's progress bar

    # The user's strategy aggregated its run: the checkpointed state is the initial
    # state plus half the weighted mean of the deltas it received.
    (strategy,) = built
    assert len(strategy.received) == 2 and strategy.populations == [2]
    total = sum(weight for _, weight in strategy.received)
    expected = {
        key: value + 0.5 * sum(w * delta[key] for delta, w in strategy.received) / total
        for key, value in strategy.initial.items()
    }
    damped_dir = out / "runs" / "damped__seed=0"
    final = load_checkpoint(damped_dir).global_state
    for key, tensor in expected.items():
        torch.testing.assert_close(final[key], tensor, atol=1e-6, rtol=1e-5)
    recorded = json.loads((damped_dir / "strategy.json").read_text())
    assert recorded["class"].endswith("test_experiments.DampedMean")
    assert RunResult.load(damped_dir).summary["strategy"] == "DampedMean"

    # Interrupt the FedAvg run after its last checkpoint, then grow the experiment to
    # two seeds: the damped run is read back, the FedAvg run resumes without training
    # again, and only the seed-1 runs train.
    fedavg_dir = out / "runs" / "fedavg__seed=0"
    rows_before = RunResult.load(fedavg_dir).rows
    (fedavg_dir / "summary.json").unlink()
    damped_metrics = (damped_dir / "metrics.jsonl").stat().st_mtime_ns
    second = run_experiment(Experiment("tiny", base, variants, seeds=[0, 1]), out)
    assert second.skipped == ["damped__seed=0"]
    assert second.ran == ["fedavg__seed=0", "fedavg__seed=1", "damped__seed=1"]
    assert (damped_dir / "metrics.jsonl").stat().st_mtime_ns == damped_metrics
    assert RunResult.load(fedavg_dir).rows == rows_before

    # One table row per arm over both seeds, a CSV row per run, plots, one page.
    assert [arm.label for arm in second.arms] == ["fedavg", "damped"]
    assert [len(arm.results) for arm in second.arms] == [2, 2]
    assert "| fedavg | 2 |" in second.table and " ± " in second.table
    assert (out / "results.md").read_text() == second.table
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("arm,variant,seeds,final-test-accuracy-mean")
    assert len(csv_lines) == 3 and len((out / "runs.csv").read_text().splitlines()) == 5
    plots = sorted((out / "plots").glob("*.png"))
    assert [p.name for p in plots] == [
        "bytes.png",
        "drift.png",
        "quality.png",
        "quality_vs_uplink.png",
    ]
    for plot in plots:
        with Image.open(plot) as image:
            assert image.format == "PNG" and image.width >= 600
    page = second.report.read_text()
    assert page.count("data:image/png;base64,") == len(plots)
    assert "damped__seed=1" in page and "runs/fedavg__seed=0/report.html" in page
    assert (fedavg_dir / "report.html").is_file() and (fedavg_dir / "plots/quality.png").is_file()

    # `fedelta report` rewrites the comparison from the folder alone.
    shutil.rmtree(out / "plots")
    second.report.unlink()
    assert cli(["report", str(out)]) == 0
    assert second.report.is_file() and len(list((out / "plots").glob("*.png"))) == 4

    # A changed experiment never mixes with the runs already there.
    with pytest.raises(ConfigError, match="lr changed"):
        run_experiment(Experiment("tiny", base.replace(lr=0.01), variants, seeds=[0]), out)


def test_private_runs_get_an_epsilon_column_and_plot(tmp_path):
    from fedelta.simulations.plots import write_plots

    rows = [
        {"round": 0, "test-accuracy": 0.5, "test-loss": 0.7},
        {"round": 1, "test-accuracy": 0.6, "test-loss": 0.6, "bytes-up": 10, "dp-epsilon": 1.5},
        {"round": 2, "test-accuracy": 0.7, "test-loss": 0.5, "bytes-up": 10, "dp-epsilon": 2.5},
    ]
    summary = {"final-test-accuracy": 0.7, "total-bytes-up": 20, "dp-epsilon": 2.5}
    private = RunResult(tmp_path / "dp", RunConfig(), summary, rows)
    plain = RunResult(tmp_path / "plain", RunConfig(), {"final-test-accuracy": 0.6}, rows[:2])
    arms = [Arm("dp", [private]), Arm("plain", [plain])]
    header, cells = formatted(arms)
    assert cells[0][header.index("epsilon")] == "2.50" and cells[1][header.index("epsilon")] == "-"
    names = [p.name for p in write_plots(arms, tmp_path / "plots")]
    assert names == ["quality.png", "bytes.png", "quality_vs_uplink.png", "epsilon.png"]
    assert "epsilon.png" not in [p.name for p in write_plots(arms[1:], tmp_path / "plain")]
    rows[1] |= {"update-cosine-mean": 0.4, "update-norm-mean": 2.0}
    drifted = [p.name for p in write_plots(arms[1:], tmp_path / "drift")]
    assert drifted == ["quality.png", "bytes.png", "quality_vs_uplink.png", "drift.png"]


def test_the_engine_is_read_from_the_file_and_checked(tmp_path):
    spec = tmp_path / "grid.toml"
    spec.write_text('[experiment]\nname = "e"\nengine = "in-process"\n[variants.a]\n')
    assert Experiment.from_toml(spec).engine == "in-process"
    assert 'engine = "in-process"' in Experiment.from_toml(spec).to_toml()
    spec.write_text('[experiment]\nname = "e"\nengine = "ray"\n[variants.a]\n')
    with pytest.raises(ConfigError, match="engine 'ray' is not one of simulation, in-process"):
        Experiment.from_toml(spec).planned_runs()


@pytest.mark.slow
def test_an_in_process_grid_leaves_a_run_claimed_elsewhere_to_that_process(
    tiny_config, tmp_path, capsys
):
    """Two processes on one folder split the runs: a run another process holds is
    neither trained nor reported, and the next call picks it up."""
    from fedelta.simulations.experiment import _claim

    base = tiny_config.replace(**{"local-steps": 1, "output-dir": ""})
    experiment = Experiment("tiny", base, {"fedavg": {}}, seeds=[0, 1], engine="in-process")
    out = tmp_path / "grid"
    with _claim(out / "runs" / "fedavg__seed=0") as claimed:
        assert claimed
        first = run_experiment(experiment, out)
    assert first.ran == ["fedavg__seed=1"] and first.skipped == []
    assert "1 run(s) were being trained by another process" in capsys.readouterr().err
    assert [len(arm.results) for arm in first.arms] == [1]
    assert RunResult.load(out / "runs" / "fedavg__seed=1").summary["engine"] == "in-process"
    second = run_experiment(experiment, out)
    assert second.ran == ["fedavg__seed=0"] and second.skipped == ["fedavg__seed=1"]
    assert [len(arm.results) for arm in second.arms] == [2]
    assert (out / "runs" / "fedavg__seed=0" / "report.html").is_file()


def test_a_seed_whose_partition_cannot_be_drawn_stops_the_grid_before_training(
    tiny_config, tmp_path
):
    """Dirichlet(0.1) over 8 sites cannot give every site 10 reviews under seed 1
    (it can under 42): the grid names that run and trains nothing, not even seed 42."""
    from fedelta.data import DataError

    base = tiny_config.replace(
        **{"output-dir": "", "data.dirichlet-alpha": 0.1, "simulation.num-supernodes": 8}
    )
    experiment = Experiment("skewed", base, {"a": {}}, seeds=[42, 1], engine="in-process")
    with pytest.raises(DataError, match=r"run a__seed=1: cannot partition .*dirichlet-alpha = 0.1"):
        run_experiment(experiment, tmp_path / "grid")
    assert not (tmp_path / "grid" / "runs").exists()
