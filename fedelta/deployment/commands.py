"""Start a secured Flower deployment of fedelta: SuperLink, SuperNodes, registration.

Each function returns the Flower command line it stands for, so what
``fedelta superlink`` / ``fedelta supernode`` run is exactly what the README and
``docker/compose.yml`` show. TLS and SuperNode authentication are on unless
``insecure`` is asked for explicitly, which logs a warning.

Ports follow Flower's defaults: the Fleet API (SuperNodes connect here, gRPC) on
9092, the only port sites need, and the Control/Runtime HTTP API (``flwr run``,
``flwr supernode register``) on 9093.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedelta.deployment.certs import (
    CA_CERT,
    RUNTIME_CERT,
    RUNTIME_KEY,
    SERVER_CERT,
    SERVER_KEY,
    SUPERNODE_KEY,
    SUPERNODE_PUBLIC_KEY,
    SUPERNODES_DIR,
)
from fedelta.errors import UserError
from fedelta.protocol import DATA_PATH, LORA_RANK, NUM_PARTITIONS, PARTITION_ID, SITE_NAME

log = logging.getLogger("fedelta")

FLEET_API_ADDRESS = "0.0.0.0:9092"
CONTROL_API_ADDRESS = "127.0.0.1:9093"
"""Loopback by default: Flower's open-source Control API has no user accounts, so
whoever reaches it can start runs and register SuperNodes. Open it only to the
operator's private network (the compose file does, inside its own network)."""
CLIENTAPP_RUNTIME_PORT = 9094
INSECURE_WARNING = (
    "running WITHOUT TLS and SuperNode authentication (--insecure): deltas and run "
    "configs cross the network in plaintext and any SuperNode may join. Use this "
    "only on a network you trust, for debugging."
)


class DeploymentError(UserError, ValueError):
    """A deployment command cannot start as asked (missing certificates, bad options)."""


def superlink_command(
    certs: Path | None,
    *,
    fleet_api_address: str = FLEET_API_ADDRESS,
    control_api_address: str = CONTROL_API_ADDRESS,
    database: str | None = None,
    insecure: bool = False,
) -> list[str]:
    """``flower-superlink`` with TLS from ``certs`` (a ``superlink/`` folder written by
    ``fedelta certs``) and only registered SuperNodes admitted."""
    host, port = _split_address(control_api_address, "--control-api-address")
    command = ["flower-superlink", "--fleet-api-address", fleet_api_address]
    command += ["--host", host, "--port", port]
    # The image already holds fedelta and its dependencies; nothing to install per run.
    command += ["--disable-runtime-dependency-installation"]
    if database:
        command += ["--database", database]
    if insecure:
        log.warning(INSECURE_WARNING)
        return [*command, "--insecure"]
    folder = _require(certs, (CA_CERT, SERVER_CERT, SERVER_KEY), "the SuperLink")
    return [
        *command,
        "--ssl-ca-certfile",
        str(folder / CA_CERT),
        "--ssl-certfile",
        str(folder / SERVER_CERT),
        "--ssl-keyfile",
        str(folder / SERVER_KEY),
        "--enable-supernode-auth",
    ]


@dataclass(frozen=True)
class SiteData:
    """What a SuperNode trains on: its own file, or a partition (for rehearsals)."""

    data_path: str = ""
    partition_id: int | None = None
    num_partitions: int | None = None

    def node_config(self, site_name: str, lora_r: int = 0) -> dict[str, str | int]:
        """The ``--node-config`` entries fedelta's ClientApp reads."""
        config: dict[str, str | int] = {SITE_NAME: site_name}
        if self.data_path:
            config[DATA_PATH] = self.data_path
        elif self.partition_id is None or self.num_partitions is None:
            raise DeploymentError(
                "a SuperNode needs its data: --data-path FILE, or --partition-id I and "
                "--num-partitions N to rehearse with a partition of the configured corpus"
            )
        if self.partition_id is not None:
            config[PARTITION_ID] = self.partition_id
        if self.num_partitions is not None:
            config[NUM_PARTITIONS] = self.num_partitions
        if lora_r:
            config[LORA_RANK] = lora_r
        return config


def supernode_command(
    certs: Path | None,
    superlink: str,
    data: SiteData,
    *,
    site_name: str = "",
    lora_r: int = 0,
    runtime_port: int = CLIENTAPP_RUNTIME_PORT,
    max_wait_time: float | None = None,
    insecure: bool = False,
) -> list[str]:
    """``flower-supernode`` for one site: verifies the SuperLink against the federation
    CA and signs in with the site's key (a ``supernodes/<site>/`` folder from
    ``fedelta certs``). The site name defaults to that folder's name."""
    name = site_name or (Path(certs).name if certs else "")
    if not name:
        raise DeploymentError("name the site: --site-name NAME")
    items = data.node_config(name, lora_r).items()
    node_config = " ".join(_node_config_item(key, value) for key, value in items)
    command = ["flower-supernode", "--superlink", superlink, "--node-config", node_config]
    # The Runtime API stays on loopback: only this SuperNode's own ClientApp
    # processes talk to it.
    command += ["--host", "127.0.0.1", "--port", str(runtime_port)]
    if max_wait_time is not None:
        command += ["--max-wait-time", str(max_wait_time)]
    if insecure:
        log.warning(INSECURE_WARNING)
        return [*command, "--insecure"]
    files = (CA_CERT, SUPERNODE_KEY, RUNTIME_CERT, RUNTIME_KEY)
    folder = _require(certs, files, f"site {name!r}")
    return [
        *command,
        "--root-certificates",
        str(folder / CA_CERT),
        "--auth-supernode-private-key",
        str(folder / SUPERNODE_KEY),
        # TLS on the loopback Runtime API as well, between SuperNode and ClientApps.
        "--ssl-certfile",
        str(folder / RUNTIME_CERT),
        "--ssl-keyfile",
        str(folder / RUNTIME_KEY),
        "--ssl-ca-certfile",
        str(folder / CA_CERT),
    ]


def connect(name: str, address: str, ca_cert: Path | None, *, insecure: bool = False) -> None:
    """Add (or update) the SuperLink connection ``name`` in Flower's CLI config
    (``$FLWR_HOME/config.toml``), so ``flwr run . NAME`` and ``flwr supernode register``
    reach the SuperLink's Control API over TLS."""
    from flwr.cli.flower_config import write_superlink_connection
    from flwr.cli.typing import SuperLinkConnection

    if insecure:
        log.warning(INSECURE_WARNING)
        connection = SuperLinkConnection(name=name, address=address, insecure=True)
    else:
        if ca_cert is None or not Path(ca_cert).is_file():
            raise DeploymentError(
                f"CA certificate {ca_cert} not found; pass --ca CERTS/ca.crt "
                "(written by fedelta certs)"
            )
        connection = SuperLinkConnection(
            name=name, address=address, root_certificates=str(Path(ca_cert).resolve())
        )
    write_superlink_connection(connection)


def register(connection: str, public_keys: Mapping[str, Path]) -> dict[str, str]:
    """Register each site's public key with the SuperLink (``flwr supernode register``).

    Returns site name to ``"registered"`` or ``"already registered"``; any other
    refusal raises, naming the site.
    """
    flwr, env = flower_binary("flwr")
    outcome = {}
    for site, key in public_keys.items():
        proc = subprocess.run(
            [flwr, "supernode", "register", str(key), connection]
            + ["--name", site, "--format", "json"],
            capture_output=True,
            text=True,
            check=False,
            env=env,
        )
        try:
            reply = json.loads(proc.stdout[proc.stdout.index("{") :])
        except ValueError:
            raise DeploymentError(
                f"registering site {site!r} failed: {(proc.stdout + proc.stderr).strip()}"
            ) from None
        if reply.get("success"):
            outcome[site] = "registered"
        elif "already in use" in reply.get("error-message", ""):
            outcome[site] = "already registered"
        else:
            raise DeploymentError(
                f"registering site {site!r} failed: {reply.get('error-message', reply)}"
            )
    return outcome


def site_public_keys(certs: Path, sites: Sequence[str] = ()) -> dict[str, Path]:
    """The public keys under ``certs/supernodes/`` (all sites, or those named)."""
    root = Path(certs) / SUPERNODES_DIR
    found = {p.parent.name: p for p in sorted(root.glob(f"*/{SUPERNODE_PUBLIC_KEY}"))}
    if not found:
        raise DeploymentError(f"no SuperNode public keys under {root}; run fedelta certs first")
    missing = [s for s in sites if s not in found]
    if missing:
        raise DeploymentError(f"no public key for site(s) {missing} under {root}")
    return {s: found[s] for s in sites} if sites else found


def flower_binary(name: str) -> tuple[str, dict[str, str]]:
    """Flower's ``name`` command and the environment to run it in: this Python's
    ``bin`` first on PATH, because Flower's processes start each other by name
    (``flower-superexec``, ``flwr-clientapp``) and must find the ones installed
    beside fedelta even when the virtualenv is not activated."""
    bin_dir = str(Path(sys.executable).parent)
    env = os.environ | {"PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")])}
    path = shutil.which(name, path=env["PATH"])
    if path is None:
        raise DeploymentError(f"'{name}' not found; install fedelta's environment (flwr)")
    return path, env


def _require(certs: Path | None, files: Sequence[str], who: str) -> Path:
    if certs is None:
        raise DeploymentError(
            f"TLS needs certificates for {who}: pass --certs DIR (from fedelta certs), "
            "or --insecure to run without TLS on a trusted network"
        )
    folder = Path(certs)
    missing = [name for name in files if not (folder / name).is_file()]
    if missing:
        raise DeploymentError(f"{who}: {', '.join(missing)} not found in {folder}")
    return folder.resolve()


def _split_address(address: str, option: str) -> tuple[str, str]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise DeploymentError(f"{option} must be HOST:PORT (got {address!r})")
    return host.strip("[]"), port


def _node_config_item(key: str, value: str | int) -> str:
    return f'{key}="{value}"' if isinstance(value, str) else f"{key}={value}"
