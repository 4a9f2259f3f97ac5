"""Test helper: a throwaway PKI made with the ``openssl`` command line.

Two unrelated CAs; a server certificate and a client certificate signed by the
first; a client certificate signed by the second (it must be refused wherever
the first CA is the trust anchor). Valid for two days, RSA 2048, no passphrase.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


def openssl_available() -> bool:
    return bool(shutil.which("openssl"))


@dataclass(frozen=True)
class Certs:
    ca: Path  # the CA that signed the server and client certificates
    other_ca: Path  # an unrelated CA (verification must fail with it)
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_client_cert: Path  # a client certificate signed by other_ca
    other_client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _issue(d: Path, name: str, cn: str, ca: str, ext: str) -> None:
    (d / f"{name}.ext").write_text(ext)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={cn}", cwd=d)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)


def make_certs(directory: Path, server_name: str = "mysql-server") -> Certs:
    """CA, server certificate for ``server_name`` and 127.0.0.1, client certificates."""
    d = directory
    d.mkdir(parents=True, exist_ok=True)
    for ca in ("ca", "other-ca"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key", "-out",
                 f"{ca}.pem", "-days", "2", "-subj", f"/CN=offline-exhook test {ca}", cwd=d)
    _issue(d, "server", server_name, "ca", f"subjectAltName=DNS:{server_name},IP:127.0.0.1\n")
    _issue(d, "client", "offline-exhook client", "ca", "extendedKeyUsage=clientAuth\n")
    _issue(d, "other-client", "offline-exhook other client", "other-ca", "extendedKeyUsage=clientAuth\n")
    return Certs(d / "ca.pem", d / "other-ca.pem", d / "server.pem", d / "server.key",
                 d / "client.pem", d / "client.key", d / "other-client.pem", d / "other-client.key")
