"""The server process is killed with SIGKILL mid-run and resumed: nothing lost or repeated."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from fedelta.server.checkpoint import load_checkpoint
from fedelta.simulations import simulate

pytestmark = pytest.mark.slow


def _rows(run_dir: Path) -> list[dict]:
    """The complete rows of a run's metrics log (a row being written is left out)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def _rounds(run_dir: Path) -> list[int]:
    return [row["round"] for row in _rows(run_dir)]


def _kill_tree(proc: subprocess.Popen) -> int:
    """SIGKILL the server and every process it started (Ray's workers included);
    returns the server's exit status."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    for target in [proc, *children]:
        try:
            target.send_signal(signal.SIGKILL)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    status = proc.wait(timeout=30)  # reaped here, so Popen keeps the real status
    psutil.wait_procs(children, timeout=30)
    return status


def test_sigkill_mid_round_then_resume_and_extend_ends_like_an_uninterrupted_run(
    tiny_config, tmp_path
):
    """A 2-round run is killed in round 2, then resumed through the CLI with one more
    round (num-server-rounds may grow on resume): it ends where a straight 3-round run
    ends, with every round recorded once and the same site sampled in each round."""
    # Rounds long enough (10 local steps) that the kill lands before the run ends; one
    # site of two per round, so the server's sampling RNG draws (and must be restored).
    config = tiny_config.replace(
        **{
            "num-server-rounds": 3,
            "fraction-evaluate": 0.0,
            "local-steps": 10,
            "fraction-train": 0.5,
            "min-train-nodes": 1,
        }
    )
    straight = simulate(
        config.replace(**{"output-dir": str(tmp_path / "straight")}), progress=False
    )
    config_file = tmp_path / "config.toml"
    config_file.write_text(config.replace(**{"num-server-rounds": 2}).to_toml())
    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "fedelta", "simulate", "--config", str(config_file)]
    log = tmp_path / "killed.log"
    proc = subprocess.Popen(
        [*command, "--out", str(killed), "--no-progress"],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        # Kill as soon as round 1 is recorded: before or after its checkpoint is written.
        while 1 not in _rounds(killed):
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "round 1 never completed"
            time.sleep(0.05)
    finally:
        status = _kill_tree(proc)
    assert status == -signal.SIGKILL, log.read_text()[-3000:]
    assert 2 not in _rounds(killed)
    assert load_checkpoint(killed).server_round in (0, 1)
    resumed = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedelta",
            "simulate",
            "--resume",
            str(killed),
            "--set",
            "num-server-rounds=3",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=os.environ,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _rounds(killed) == [0, 1, 2, 3]  # no round lost or counted twice
    sampled = [row["sites-sampled"] for row in straight.rows[1:]]
    assert all(len(sites) == 1 for sites in sampled) and len({s[0] for s in sampled}) == 2
    assert [row["sites-sampled"] for row in _rows(killed)[1:]] == sampled
    a, b = load_checkpoint(straight.run_dir), load_checkpoint(killed)
    assert a.server_round == b.server_round == 3
    for name, tensor in a.global_state.items():
        torch.testing.assert_close(b.global_state[name], tensor, rtol=1e-5, atol=1e-6)
