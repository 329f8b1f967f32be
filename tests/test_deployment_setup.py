"""What a deployment is built from: certificates, node configs, commands, compose files."""

from __future__ import annotations

import logging
import shlex
import stat
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    load_pem_private_key,
    load_ssh_private_key,
    load_ssh_public_key,
)

from fedelta.cli import main
from fedelta.deployment import commands as deployment
from fedelta.deployment.certs import CertificateError, generate_certs, site_names
from fedelta.protocol import NodeConfigError, Site

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return generate_certs(tmp_path_factory.mktemp("certs"), "superlink.example.org", site_names(2))


def test_server_certificate_is_signed_by_the_ca_for_the_superlink_host_and_loopback(certs):
    ca = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate((certs.superlink / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["superlink.example.org", "localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    key = load_pem_private_key((certs.superlink / "server.key").read_bytes(), None)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()


def test_ip_host_goes_into_the_certificate_as_an_ip(tmp_path):
    written = generate_certs(tmp_path, "10.1.2.3", ["a"])
    server = x509.load_pem_x509_certificate((written.superlink / "server.pem").read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "10.1.2.3" in [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]


def test_site_keys_are_nist_ecdsa_in_openssh_format_and_private_files_are_0600(certs):
    for site in certs.sites:
        folder = certs.site(site)
        private = load_ssh_private_key((folder / "supernode.key").read_bytes(), None)
        public = load_ssh_public_key((folder / "supernode.pub").read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert private.curve.name == "secp384r1"
        assert private.public_key().public_numbers() == public.public_numbers()
        assert (folder / "ca.crt").read_bytes() == certs.ca_cert.read_bytes()
    private_files = [certs.root / "ca.key", certs.superlink / "server.key"]
    private_files += [certs.site(s) / "supernode.key" for s in certs.sites]
    for path in private_files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(certs.ca_cert.stat().st_mode) == 0o644


def test_flower_accepts_the_site_public_key(certs):
    from flwr.cli.supernode.register import try_load_public_key

    assert try_load_public_key(certs.site("site-0") / "supernode.pub")


def test_certs_refuse_to_overwrite_without_force(tmp_path, capsys):
    args = ["certs", "--out", str(tmp_path), "--superlink-host", "localhost", "--supernodes", "1"]
    assert main(args) == 0
    ca = (tmp_path / "ca.crt").read_bytes()
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "ca.crt").read_bytes() == ca
    assert main([*args, "--force"]) == 0
    assert (tmp_path / "ca.crt").read_bytes() != ca


@pytest.mark.parametrize(
    ("count", "names", "message"),
    [(0, (), "at least one"), (1, ("a b",), "must start with"), (1, ("a", "a"), "repeat")],
)
def test_bad_site_names(count, names, message):
    with pytest.raises(CertificateError, match=message):
        site_names(count, names)


def test_node_config_with_a_data_file():
    site = Site.from_node_config({"data-path": "/data/train.csv", "site-name": "hospital-a"})
    assert (site.name, site.data_path, site.num_partitions) == ("hospital-a", "/data/train.csv", 0)
    again = Site.from_node_config({"data-path": "/x.csv", "site-name": "hospital-a"})
    assert again.partition_id == site.partition_id  # stable, from the name
    with pytest.raises(NodeConfigError, match="no 'site-name'"):
        Site.from_node_config({"data-path": "/data/train.csv"})
    with pytest.raises(NodeConfigError, match="data-path=FILE"):
        Site.from_node_config({})


def test_superlink_command_is_tls_with_node_auth_and_insecure_warns(certs, caplog):
    command = deployment.superlink_command(certs.superlink)
    assert "--enable-supernode-auth" in command and "--insecure" not in command
    assert command[command.index("--ssl-certfile") + 1].endswith("server.pem")
    assert command[command.index("--host") + 1] == "127.0.0.1"  # Control API private
    with pytest.raises(deployment.DeploymentError, match="--insecure"):
        deployment.superlink_command(None)
    with caplog.at_level(logging.WARNING, logger="fedelta"):
        insecure = deployment.superlink_command(None, insecure=True)
    assert "--insecure" in insecure and "--enable-supernode-auth" not in insecure
    assert "WITHOUT TLS" in caplog.text


def test_supernode_command_carries_the_site_and_its_key(certs):
    data = deployment.SiteData(data_path="/data/train.csv")
    command = deployment.supernode_command(certs.site("site-1"), "link:9092", data)
    node_config = command[command.index("--node-config") + 1]
    assert node_config == 'site-name="site-1" data-path="/data/train.csv"'
    assert command[command.index("--auth-supernode-private-key") + 1].endswith(
        "site-1/supernode.key"
    )
    # The loopback Runtime API between the SuperNode and its ClientApps is TLS too.
    assert command[command.index("--ssl-certfile") + 1].endswith("site-1/runtime.pem")
    assert command[command.index("--host") + 1] == "127.0.0.1"
    with pytest.raises(deployment.DeploymentError, match="needs its data"):
        deployment.supernode_command(certs.site("site-1"), "link:9092", deployment.SiteData())
    with pytest.raises(
        deployment.DeploymentError, match="supernode.key, runtime.pem, runtime.key not found"
    ):
        deployment.supernode_command(certs.root, "link:9092", data, site_name="x")


def _compose(name: str) -> dict:
    return yaml.safe_load((DOCKER / name).read_text())


@pytest.mark.parametrize("name", ["compose.yml", "site.yml"])
def test_compose_services_are_complete_secure_and_mount_certs_read_only(name):
    services = _compose(name)["services"]
    for service, spec in services.items():
        assert spec.get("image") and spec.get("build"), service
        assert spec.get("command"), service
        assert spec.get("volumes"), service
        command = spec["command"]
        text = " ".join(command) if isinstance(command, list) else command
        assert "--insecure" not in text, service
        for volume in spec["volumes"]:
            source, target, *mode = volume.rsplit(":", 2)
            if "cert" in source.lower() or target.startswith("/certs"):
                assert mode == ["ro"], f"{service}: {volume} must be read-only"
            # The CA's key never leaves the operator; no service gets the whole folder.
            assert "ca.key" not in source and source.rstrip("/") != "./certs", volume


def test_rehearsal_has_one_superlink_and_three_sites_each_with_its_own_data_and_key():
    services = _compose("compose.yml")["services"]
    sites = {name: spec for name, spec in services.items() if "supernode" in spec["command"]}
    assert sorted(sites) == ["site-0", "site-1", "site-2"]
    data = {v for spec in sites.values() for v in spec["volumes"] if v.endswith(":/data:ro")}
    keys = {v for spec in sites.values() for v in spec["volumes"] if ":/certs/site:" in v}
    assert len(data) == len(keys) == 3
    link = services["superlink"]
    assert "superlink" in link["command"]
    assert any("--certs=" in arg for arg in link["command"])
    assert link["ports"] == ["9092:9092"]  # the Control API is not published
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert "torch==2.13.0" in dockerfile and "whl/cpu" in dockerfile


def test_compose_commands_parse_as_fedelta_commands():
    """What compose runs must be accepted by fedelta's own CLI (argument names drift)."""
    from fedelta.cli import _parser

    checked = 0
    for name in ("compose.yml", "site.yml"):
        for spec in _compose(name)["services"].values():
            if spec["command"][0] in ("superlink", "supernode"):
                _parser().parse_args([*spec["command"], "--dry-run"])
                checked += 1
    assert checked == 5


def _readme_commands() -> list[list[str]]:
    """The `fedelta ...` command lines of the README's shell blocks, continuations joined."""
    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        line = line.strip().removeprefix(".venv/bin/")
        if line.startswith("fedelta "):
            words = shlex.split(line.split(" #")[0].rstrip("& "))
            commands.append(words[1:])
    return commands


def test_readme_deployment_commands_parse():
    from fedelta.cli import _parser

    commands = _readme_commands()
    used = {c[0] for c in commands}
    assert {"certs", "partition", "superlink", "supernode", "connect", "register"} <= used
    for command in commands:
        _parser().parse_args(command)


def test_a_server_without_data_needs_only_the_label_names(tmp_path):
    from fedelta.config import RunConfig
    from fedelta.data import DataError
    from fedelta.server.evaluation import CentralEvaluator

    missing = str(tmp_path / "server-has-no-data.csv")
    config = RunConfig().replace(
        **{"data.name": missing, "data.labels": "fresh,rotten", "central-evaluation": False}
    )
    evaluator = CentralEvaluator(config)
    assert evaluator.label_names == ("fresh", "rotten")
    with pytest.raises(DataError, match="does not exist"):
        CentralEvaluator(config.replace(**{"central-evaluation": True}))
