"""Certificates and keys for a secured Flower deployment.

One call writes everything a federation needs, in the formats Flower 1.39 reads:

```
OUT/ca.crt                            the CA every party trusts (public)
OUT/ca.key                            the CA's key: keep it offline (0600)
OUT/superlink/ca.crt, server.pem      what the SuperLink host mounts: TLS for the
OUT/superlink/server.key              Fleet, Control and Runtime APIs (key 0600)
OUT/supernodes/<site>/ca.crt          what one site receives: the CA to verify the
OUT/supernodes/<site>/supernode.key   SuperLink, its ECDSA key in OpenSSH format
OUT/supernodes/<site>/supernode.pub   (0600), and the public key to register;
OUT/supernodes/<site>/runtime.pem/key  TLS between the SuperNode and its ClientApps
```

The server certificate names the SuperLink host (DNS name or IP) and the loopback
names, because the SuperLink's own ServerApp process connects to it locally. Each
site also gets a loopback server certificate, so the SuperNode's Runtime API (which
its ClientApp processes connect to) is TLS too: no connection is plaintext.
Node-authentication keys are ECDSA on NIST P-384, the curve Flower's
``flwr supernode register`` accepts.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedelta.errors import UserError

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SUPERLINK_DIR = "superlink"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
SUPERNODES_DIR = "supernodes"
SUPERNODE_KEY = "supernode.key"
SUPERNODE_PUBLIC_KEY = "supernode.pub"
RUNTIME_CERT = "runtime.pem"
RUNTIME_KEY = "runtime.key"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class CertificateError(UserError, ValueError):
    """The certificates cannot be written as asked (existing files, bad names)."""


@dataclass(frozen=True)
class FederationCerts:
    """Where :func:`generate_certs` wrote each file."""

    root: Path
    sites: tuple[str, ...]

    @property
    def ca_cert(self) -> Path:
        return self.root / CA_CERT

    @property
    def superlink(self) -> Path:
        return self.root / SUPERLINK_DIR

    def site(self, name: str) -> Path:
        return self.root / SUPERNODES_DIR / name


def site_names(count: int, names: Sequence[str] = ()) -> tuple[str, ...]:
    """``names`` if given, else ``site-0`` ... ``site-{count-1}`` (partition ids)."""
    chosen = tuple(names) or tuple(f"site-{i}" for i in range(count))
    if not chosen:
        raise CertificateError("at least one SuperNode is needed (--supernodes N, N >= 1)")
    for name in chosen:
        if not _SITE_NAME.match(name):
            raise CertificateError(
                f"site name {name!r} must start with a letter or digit and use only "
                "letters, digits, '.', '_' and '-'"
            )
    if len(set(chosen)) != len(chosen):
        raise CertificateError(f"site names repeat: {', '.join(chosen)}")
    return chosen


def generate_certs(
    out: Path,
    superlink_host: str,
    sites: Sequence[str],
    *,
    force: bool = False,
    valid_days: int = 365,
) -> FederationCerts:
    """Write a CA, the SuperLink's TLS certificate and one key pair per site.

    Refuses to overwrite any existing file unless ``force``: replacing a CA
    silently would lock every deployed site out.
    """
    if not superlink_host.strip():
        raise CertificateError("--superlink-host must name the host sites connect to")
    certs = FederationCerts(Path(out), tuple(sites))
    planned = [certs.root / CA_CERT, certs.root / CA_KEY]
    planned += [certs.superlink / n for n in (CA_CERT, SERVER_CERT, SERVER_KEY)]
    site_files = (CA_CERT, SUPERNODE_KEY, SUPERNODE_PUBLIC_KEY, RUNTIME_CERT, RUNTIME_KEY)
    for site in certs.sites:
        planned += [certs.site(site) / n for n in site_files]
    existing = [p for p in planned if p.exists()]
    if existing and not force:
        raise CertificateError(
            f"{existing[0]} already exists ({len(existing)} file(s) would be replaced); "
            "pass --force to overwrite"
        )

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedelta federation CA")])
    ca_cert = (
        _builder(ca_name, ca_name, ca_key.public_key(), now, valid_days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA384())
    )

    server_key, server_cert = _server_certificate(
        superlink_host, _san(superlink_host), ca_key, ca_name, now, valid_days
    )
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    _write(certs.root / CA_CERT, ca_pem)
    _write(certs.root / CA_KEY, _pem_private(ca_key), private=True)
    _write(certs.superlink / CA_CERT, ca_pem)
    _write(certs.superlink / SERVER_CERT, server_cert.public_bytes(serialization.Encoding.PEM))
    _write(certs.superlink / SERVER_KEY, _pem_private(server_key), private=True)
    for site in certs.sites:
        runtime_key, runtime_cert = _server_certificate(
            f"{site} runtime", _san("localhost"), ca_key, ca_name, now, valid_days
        )
        _write(
            certs.site(site) / RUNTIME_CERT, runtime_cert.public_bytes(serialization.Encoding.PEM)
        )
        _write(certs.site(site) / RUNTIME_KEY, _pem_private(runtime_key), private=True)
        node_key = ec.generate_private_key(ec.SECP384R1())
        _write(certs.site(site) / CA_CERT, ca_pem)
        _write(
            certs.site(site) / SUPERNODE_KEY,
            node_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.OpenSSH,
                serialization.NoEncryption(),
            ),
            private=True,
        )
        public = node_key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        _write(certs.site(site) / SUPERNODE_PUBLIC_KEY, public + f" {site}\n".encode())
    return certs


def _server_certificate(
    common_name: str,
    names: list[x509.GeneralName],
    ca_key: ec.EllipticCurvePrivateKey,
    ca_name: x509.Name,
    now: datetime.datetime,
    valid_days: int,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A TLS server key and certificate for ``names``, signed by the CA."""
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        _builder(subject, ca_name, key.public_key(), now, valid_days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    now: datetime.datetime,
    valid_days: int,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=valid_days))
    )


def _key_usage(ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _san(host: str) -> list[x509.GeneralName]:
    """The SuperLink's host (DNS name or IP) plus loopback, each once."""
    names: list[x509.GeneralName] = []
    for name in dict.fromkeys((host, *LOOPBACK_NAMES)):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            names.append(x509.DNSName(name))
    return names


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, private: bool = False) -> None:
    """Write ``data``; a private key is created 0600 so it is never readable by others."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = 0o600 if private else 0o644
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, mode)
