"""The repository is a Flower App: `flwr run .` runs the same ServerApp and ClientApp."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop_processes_mentioning(marker: str) -> None:
    """Stop the SuperLink `flwr run` started (and its children), found by our FLWR_HOME."""
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if marker in " ".join(proc.info["cmdline"] or []):
            try:
                os.killpg(os.getpgid(proc.pid), signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                proc.kill()


def test_flwr_run_dot(tmp_path):
    bin_dir = Path(sys.executable).parent
    flwr_home = tmp_path / "flwr-home"
    out = tmp_path / "run"
    env = os.environ | {
        "FLWR_HOME": str(flwr_home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
        "HF_HUB_OFFLINE": "1",
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    overrides = (
        f"num-server-rounds=1 local-steps=2 batch-size=8 data.test-size=64 "
        f"model.max-length=32 output-dir='{out}'"
    )
    try:
        proc = subprocess.run(
            [str(bin_dir / "flwr"), "run", str(ROOT), "--stream", "--run-config", overrides],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
    finally:
        _stop_processes_mentioning(str(flwr_home))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    assert rows[1]["clients-replied"] == rows[1]["clients-sampled"] == 2  # Flower's default
    assert (out / "adapter" / "adapter_config.json").is_file()
