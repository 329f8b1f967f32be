"""Compatibility rules follow the components' own flags, and the layers stay apart.

Each rule of :func:`fedelta.compatibility.check_config` is exercised with a fake
component registered beside the real ones: flipping the flag it declares flips
the verdict, so no rule can be a list of names that a new component would miss.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from fedelta.compatibility import check_config
from fedelta.compression import SPARSITY
from fedelta.config import ConfigError, RunConfig, load_config
from fedelta.strategies import LORA_AGGREGATIONS, OPTIMIZERS
from fedelta.strategies.lora import NaiveLora
from fedelta.strategies.optimizers import FedAvg
from fedelta.tasks import TASKS, Classification


def _fake_rule(**flags: bool) -> type[NaiveLora]:
    return type("FakeLora", (NaiveLora,), {"name": "fake", "summary": "a test rule", **flags})


@pytest.fixture
def register(monkeypatch):
    """Register ``entry`` as ``name`` in ``registry`` for one test."""

    def add(registry, name, entry):
        monkeypatch.setitem(registry._entries, name, entry)
        monkeypatch.setitem(registry._summaries, name, "a test entry")

    return add


@pytest.mark.parametrize(
    ("flag", "overrides", "refusal"),
    [
        (
            "factor_space",
            {"compression.half-finetuning": True},
            "'compression.half-finetuning' freezes whole LoRA modules, which strategy.lora = "
            "'fake'",
        ),
        (
            "linear",
            {"privacy.client-dp": "distributed", "privacy.client-target-epsilon": 1.0},
            "strategy.lora = 'fake' does not combine uploads by summing them",
        ),
        (
            "refactorable",
            {"strategy.rank-projection": "svd"},
            "which strategy.lora = 'fake' keeps fixed, local or empty",
        ),
    ],
)
def test_lora_rule_refusals_follow_the_rules_flags(register, flag, overrides, refusal):
    config = RunConfig().replace(**{"strategy.lora": "fake", **overrides})
    register(LORA_AGGREGATIONS, "fake", _fake_rule(**{flag: True}))
    check_config(config)
    register(LORA_AGGREGATIONS, "fake", _fake_rule(**{flag: False}))
    with pytest.raises(ConfigError, match=refusal):
        check_config(config)


def test_full_finetuning_follows_needs_adapter(register):
    config = RunConfig().replace(**{"strategy.lora": "fake", "model.finetuning": "full"})
    register(LORA_AGGREGATIONS, "fake", _fake_rule(needs_adapter=False))
    check_config(config)
    register(LORA_AGGREGATIONS, "fake", _fake_rule(needs_adapter=True))
    with pytest.raises(ConfigError, match="'fake' aggregates LoRA factors, but model.finetuning"):
        check_config(config)


def test_secure_aggregation_follows_the_sparsity_methods_flag(register):
    secure = {
        "privacy.secure-aggregation": True,
        "min-train-nodes": 3,
        "min-available-nodes": 3,
        "compression.sparsity": "fake",
    }
    config = RunConfig().replace(**secure)
    shared = dataclasses.replace(SPARSITY["random-mask"], name="fake")
    register(SPARSITY, "fake", shared)
    check_config(config)
    register(SPARSITY, "fake", dataclasses.replace(shared, sends_indices=True))
    with pytest.raises(ConfigError, match="'compression.sparsity' = 'fake' cannot be combined"):
        check_config(config)


def test_dp_sgd_refuses_an_optimizer_that_changes_the_client_loss(register):
    config = RunConfig().replace(
        **{"strategy.optimizer": "fake", "privacy.dp-sgd": True, "privacy.target-epsilon": 3.0}
    )
    plain = type("FakeOptimizer", (FedAvg,), {"name": "fake"})
    register(OPTIMIZERS, "fake", plain)
    check_config(config)
    term = type("FakeOptimizer", (FedAvg,), {"name": "fake", "client_loss_term": "a pull term"})
    register(OPTIMIZERS, "fake", term)
    with pytest.raises(ConfigError, match="a pull term in the clients' loss"):
        check_config(config)


def test_partitioners_and_packing_follow_the_task(register):
    config = RunConfig().replace(**{"model.task": "fake", "data.partitioner": "topic"})
    topical = type(
        "FakeTask", (Classification,), {"name": "fake", "partitioners": ("topic",), "packs": True}
    )
    register(TASKS, "fake", topical)
    check_config(config.replace(**{"data.packing": True}))
    register(TASKS, "fake", type("FakeTask", (topical,), {"partitioners": ("iid",)}))
    with pytest.raises(ConfigError, match='use "iid" with model.task = "fake"'):
        check_config(config)


@pytest.mark.parametrize(
    ("old", "new"),
    [("strategy.name", "strategy.optimizer"), ("strategy.robust", "strategy.aggregator")],
)
def test_a_renamed_key_names_its_new_name(tmp_path, old, new):
    with pytest.raises(ConfigError, match=f"config key '{old}' was renamed to '{new}'"):
        load_config(None, [f"{old}=mean"])
    table, key = old.split(".")
    path = tmp_path / "old.toml"
    path.write_text(f'[{table}]\n{key} = "fedavg"\n')
    with pytest.raises(ConfigError, match=f"was renamed to '{new}'"):
        load_config(path)


def test_unknown_component_names_list_the_registered_ones():
    with pytest.raises(ConfigError, match="'strategy.lora' must be one of naive, ffa, fedsa"):
        check_config(RunConfig().replace(**{"strategy.lora": "hetlora"}))
    assert list(LORA_AGGREGATIONS) == ["naive", "ffa", "fedsa", "fedex", "flora"]


def _loaded_after(statement: str) -> set[str]:
    """The fedelta and heavy third-party modules a fresh interpreter holds after ``statement``."""
    code = (
        f"import sys, json; {statement}; "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('fedelta', 'transformers', 'peft', 'flwr', 'opacus', 'ray'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout))


def test_the_config_schema_loads_no_other_part_of_fedelta():
    assert _loaded_after("import fedelta.config") == {
        "fedelta",
        "fedelta.config",
        "fedelta.config.sections",
        "fedelta.errors",
    }


def test_the_tensor_vocabulary_loads_nothing_else_of_fedelta():
    loaded = _loaded_after("import fedelta.tensors, fedelta.seeding")
    assert loaded == {"fedelta", "fedelta.seeding", "fedelta.tensors"}


def test_the_compression_package_loads_no_strategy_server_or_model_code():
    loaded = _loaded_after("import fedelta.compression.sparse")
    heavy = {m for m in loaded if m.split(".")[0] in ("transformers", "peft", "opacus", "ray")}
    assert not heavy
    assert not {m for m in loaded if m.startswith(("fedelta.server", "fedelta.strategies"))}
    assert "fedelta.models" not in loaded and "fedelta.compatibility" not in loaded


def test_an_experiment_refuses_a_bad_combination_before_anything_trains():
    from fedelta.simulations import Experiment

    bad = {"privacy.dp-sgd": True, "privacy.target-epsilon": 3.0, "strategy.optimizer": "fedprox"}
    with pytest.raises(ConfigError, match="variant 'bad'.*proximal term"):
        Experiment("p", variants={"good": {}, "bad": bad}).planned_runs()


def test_a_run_folder_of_an_earlier_release_reads_under_the_new_keys(tmp_path):
    saved = tmp_path / "config.toml"
    saved.write_text('[strategy]\nname = "fedadam"\nrobust = "median"\n')
    with pytest.raises(ConfigError, match=f"config file '{saved}': key 'strategy.name' was"):
        load_config(saved)
    config = load_config(saved, follow_renames=True)
    assert (config.strategy.optimizer, config.strategy.aggregator) == ("fedadam", "median")


def test_an_unknown_partitioner_is_refused_by_the_data_layer_too():
    from fedelta.config import DataConfig
    from fedelta.data import DataError, load_client_data

    with pytest.raises(DataError, match="data.partitioner must be one of iid, dirichlet, topic"):
        load_client_data(DataConfig(partitioner="shards"), 0, 4, 0)
