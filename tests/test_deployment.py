"""A secured multi-site deployment, end to end, with Flower's own binaries on loopback.

The same commands the compose file runs (``fedelta certs``, ``fedelta superlink``,
``fedelta register``, ``fedelta supernode``, ``flwr run``) start a SuperLink with
TLS and SuperNode authentication and two SuperNodes, each with its own data file.
Every process is started in its own session and stopped by its pid at the end.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Processes:
    """Long-running processes of one test, each in its own session, stopped by pid."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs = env, logs
        self.started: dict[str, subprocess.Popen] = {}

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("w")
        proc = subprocess.Popen(
            [str(BIN / "fedelta"), *args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.started[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def stop_all(self) -> list[int]:
        """SIGTERM each process group, SIGKILL what is left; returns pids still alive."""
        members = []
        for proc in self.started.values():
            try:
                parent = psutil.Process(proc.pid)
                members += [parent, *parent.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        _, alive = psutil.wait_procs(members, timeout=15)
        for member in alive:
            member.kill()
        _, alive = psutil.wait_procs(alive, timeout=5)
        for proc in self.started.values():
            proc.wait(timeout=5)
        return [p.pid for p in alive]


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "SuperLink exited during startup"
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"nothing listens on {port}")


def _fedelta(env: dict[str, str], *args: str) -> str:
    proc = subprocess.run(
        [str(BIN / "fedelta"), *args], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A running SuperLink (TLS + node auth) with site-0 and site-1 registered."""
    root = tmp_path_factory.mktemp("deployment")
    env = os.environ | {
        "FLWR_HOME": str(root / "flwr-home"),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "HF_HUB_OFFLINE": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    fleet, control = _free_port(), _free_port()
    certs, data = root / "certs", root / "data"
    _fedelta(
        env, "certs", "--out", str(certs), "--superlink-host", "localhost", "--supernodes", "3"
    )
    _fedelta(env, "partition", "--num-partitions", "2", "--out", str(data))
    processes = Processes(env, root)
    link = processes.start(
        "superlink",
        "superlink",
        f"--certs={certs / 'superlink'}",
        f"--fleet-api-address=127.0.0.1:{fleet}",
        f"--control-api-address=127.0.0.1:{control}",
    )
    try:
        _wait_for_port(control, link)
        _fedelta(
            env,
            "connect",
            "test",
            "--address",
            f"127.0.0.1:{control}",
            "--ca",
            str(certs / "ca.crt"),
        )
        # site-2 has a key pair but is never registered.
        registered = _fedelta(
            env, "register", "test", "--certs", str(certs), "--sites", "site-0,site-1"
        )
        assert "site-0: registered" in registered and "site-1: registered" in registered
        yield {
            "root": root,
            "env": env,
            "certs": certs,
            "data": data,
            "fleet": f"127.0.0.1:{fleet}",
            "processes": processes,
        }
    finally:
        left = processes.stop_all()
        assert not left, f"processes still running after stop: {left}"


def test_unregistered_supernode_is_refused(federation: dict) -> None:
    proc = federation["processes"].start(
        "site-2",
        "supernode",
        f"--certs={federation['certs'] / 'supernodes' / 'site-2'}",
        f"--superlink={federation['fleet']}",
        "--partition-id=0",
        "--num-partitions=2",
        f"--runtime-port={_free_port()}",
        "--max-wait-time=20",
    )
    assert proc.wait(timeout=90) != 0
    assert "Failed to activate SuperNode" in federation["processes"].log("site-2")
    assert "No SuperNode found with the given public key" in federation["processes"].log(
        "superlink"
    )


def test_plaintext_supernode_is_refused(federation: dict) -> None:
    proc = federation["processes"].start(
        "plaintext",
        "supernode",
        "--insecure",
        "--site-name=intruder",
        f"--superlink={federation['fleet']}",
        "--partition-id=0",
        "--num-partitions=2",
        f"--runtime-port={_free_port()}",
        "--max-wait-time=10",
    )
    assert proc.wait(timeout=90) != 0
    log = federation["processes"].log("plaintext")
    assert "WITHOUT TLS" in log  # fedelta warned before starting it
    # Refused at the connection (the TLS SuperLink never answers a plaintext channel),
    # not by node authentication or a crash: it retried until --max-wait-time, gave up.
    assert "Giving up reconnection after" in log, log[-2000:]
    assert "SuperNode ID" not in log  # it never joined
    assert "Failed to activate SuperNode" not in log


def test_two_sites_train_two_rounds_over_tls(federation: dict) -> None:
    processes, env = federation["processes"], federation["env"]
    for site in ("site-0", "site-1"):
        processes.start(
            site,
            "supernode",
            f"--certs={federation['certs'] / 'supernodes' / site}",
            f"--superlink={federation['fleet']}",
            f"--data-path={federation['data'] / site / 'train.csv'}",
            f"--runtime-port={_free_port()}",
        )
    out = federation["root"] / "run"
    overrides = (
        "num-server-rounds=2 local-steps=2 batch-size=8 data.test-size=64 "
        f"data.validation-fraction=0.02 model.max-length=32 output-dir='{out}'"
    )
    started = time.monotonic()
    run = subprocess.run(
        [str(BIN / "flwr"), "run", str(ROOT), "test", "--stream", "--run-config", overrides],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    wall = time.monotonic() - started
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert row["clients-replied"] == 2 and row["clients-failed"] == {}
        assert sorted(row["sites-sampled"]) == ["site-0", "site-1"]
        assert row["bytes-down"] > 0 and row["bytes-up"] > 0
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert processes.log("superlink").count("Activated node_id") == 2
    for site in ("site-0", "site-1"):
        assert processes.started[site].poll() is None, processes.log(site)[-2000:]
    print(f"\n2-round deployment over TLS: {wall:.1f} s; rows: {rows[1:]}")
