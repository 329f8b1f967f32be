import sys
from pathlib import Path

import pytest

from fedelta.compatibility import check_config
from fedelta.config import ConfigError, RunConfig, load_config, parse_overrides

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def _flower_app_config() -> dict:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    from fedelta.config import flatten_mapping

    return flatten_mapping(pyproject["tool"]["flwr"]["app"]["config"])


def test_flower_app_config_equals_the_schema_defaults():
    # `flwr run .` reads pyproject; `fedelta simulate` reads the schema: they must agree.
    assert _flower_app_config() == RunConfig().to_flat()


def test_keys_follow_flower_run_config_names():
    flat = RunConfig().to_flat()
    for key in ("num-server-rounds", "fraction-train", "fraction-evaluate", "local-epochs"):
        assert key in flat


def test_toml_round_trip(tmp_path):
    config = RunConfig().replace(**{"lora.r": 4, "lr": 0.01, "data.name": 'my "quoted" file.csv'})
    path = tmp_path / "c.toml"
    path.write_text(config.to_toml())
    assert load_config(path) == config


def test_overrides_parse_toml_literals_and_bare_strings():
    parsed = parse_overrides(["lora.r=4", "lr=1e-4", "central-evaluation=false", "data.name=x.csv"])
    assert parsed == {"lora.r": 4, "lr": 1e-4, "central-evaluation": False, "data.name": "x.csv"}
    assert load_config(None, ["lora.r=4"]).lora.r == 4


def test_int_is_accepted_for_float_keys():
    assert RunConfig.from_flat({"lr": 1}).lr == 1.0


@pytest.mark.parametrize(
    ("flat", "message"),
    [
        ({"lora.rank": 8}, "unknown config key 'lora.rank'"),
        ({"num-rounds": 3}, "unknown config key 'num-rounds'"),
        ({"lora": 3}, "config key 'lora' is a section"),
        ({"lora.r": "8"}, "config key 'lora.r' must be of type int, got str"),
        ({"lora.r": 2.5}, "config key 'lora.r' must be of type int, got float"),
        ({"num-server-rounds": True}, "config key 'num-server-rounds' must be of type int"),
        ({"central-evaluation": 1}, "config key 'central-evaluation' must be of type bool"),
        ({"lora.r": 0}, "config key 'lora.r' must be >= 1 (got 0)"),
        ({"lr": -0.1}, "config key 'lr' must be > 0 (got -0.1)"),
        ({"fraction-train": 0.0}, "config key 'fraction-train' must be in (0, 1]"),
        (
            {"data.partitioner": "shards"},
            "config key 'data.partitioner' must be one of iid, dirichlet",
        ),
        ({"strategy.optimizer": "fedmagic"}, "'strategy.optimizer' must be one of"),
        ({"strategy": "fedavg"}, "'strategy' is a section"),
        ({"lora.target-modules": " , "}, "config key 'lora.target-modules' must name a module"),
        ({"max-update-norm": -1.0}, "config key 'max-update-norm' must be >= 0"),
        ({"round-retries": -1}, "config key 'round-retries' must be >= 0"),
        ({"data.labels": "pos"}, "'data.labels' must list at least 2 distinct label names"),
        ({"data.labels": "pos,pos"}, "'data.labels' must list at least 2 distinct label names"),
    ],
)
def test_bad_config_names_the_key(flat, message):
    with pytest.raises(ConfigError) as err:
        check_config(RunConfig.from_flat(flat))
    assert message in str(err.value)


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(None, ["lora.r"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("lora.r = = 3")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(bad)


@pytest.mark.parametrize("path", sorted(Path(__file__).parent.parent.glob("examples/*.toml")))
def test_every_example_config_loads(path):
    check_config(load_config(path))
