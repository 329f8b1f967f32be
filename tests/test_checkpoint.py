import os

import numpy as np
import pytest
import torch

from fedelta.server import checkpoint as ckpt
from fedelta.server.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint


def _checkpoint(server_round: int) -> Checkpoint:
    rng = np.random.default_rng(7)
    rng.random(3)
    return Checkpoint(
        server_round=server_round,
        global_state={"a.lora_A": torch.full((2, 3), float(server_round))},
        strategy_tensors={"momentum.a": torch.ones(2)},
        strategy_meta={"steps": server_round},
        rng_state=rng.bit_generator.state,
    )


def test_round_trip_restores_tensors_meta_and_rng(tmp_path):
    saved = _checkpoint(3)
    save_checkpoint(tmp_path, saved)
    loaded = load_checkpoint(tmp_path)
    assert loaded.server_round == 3
    assert torch.equal(loaded.global_state["a.lora_A"], saved.global_state["a.lora_A"])
    assert torch.equal(loaded.strategy_tensors["momentum.a"], torch.ones(2))
    assert loaded.strategy_meta == {"steps": 3}
    a, b = np.random.default_rng(), np.random.default_rng()
    a.bit_generator.state, b.bit_generator.state = saved.rng_state, loaded.rng_state
    assert np.array_equal(a.random(5), b.random(5))


def test_a_crash_during_the_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, _checkpoint(1))

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, _checkpoint(2))
    monkeypatch.undo()
    assert load_checkpoint(tmp_path).server_round == 1
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_missing_and_torn_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="nothing to resume"):
        load_checkpoint(tmp_path)
    (tmp_path / ckpt.FILENAME).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{tor")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(tmp_path)


def test_a_metrics_line_cut_by_a_kill_is_dropped_on_resume(tmp_path):
    from fedelta.server.metrics import MetricsLog

    log = MetricsLog(tmp_path)
    for server_round in range(3):
        log.append({"round": server_round})
    with log.path.open("a") as handle:
        handle.write('{"round": 3, "test-acc')  # the process died mid-write
    assert [r["round"] for r in log.rows()] == [0, 1, 2]
    log.truncate_after(1)
    assert log.path.read_text() == '{"round": 0}\n{"round": 1}\n'
    log.path.write_text('{"round": 0}\nnot json\n{"round": 2}\n')
    with pytest.raises(CheckpointError, match="line 2, is not JSON"):
        log.rows()  # damage before the last line is not a crash artefact: never hidden
