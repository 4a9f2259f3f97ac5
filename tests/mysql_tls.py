"""Test helper: a second, private ``mariadbd`` on a free loopback port with its own
temporary datadir, TLS (certificates from ``tests/certs.py``) and
``require_secure_transport = ON``. Stopped by PID (never by name)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pymysql

from tests.certs import Certs, make_certs, openssl_available
from tests.ports import free_port

__all__ = ["Certs", "MariaDbServer", "free_port", "make_certs", "tools_available"]

MARIADBD = shutil.which("mariadbd") or "/usr/sbin/mariadbd"
INSTALL_DB = shutil.which("mariadb-install-db") or shutil.which("mysql_install_db") or ""


def tools_available() -> bool:
    return openssl_available() and os.path.exists(MARIADBD) and bool(INSTALL_DB)


class MariaDbServer:
    """A private mariadbd (root, empty password) on 127.0.0.1:<port>."""

    def __init__(self, base: Path, certs: Certs | None, require_tls: bool = True) -> None:
        self.base = base
        self.datadir = base / "data"
        self.certs = certs
        self.require_tls = require_tls
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def install(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [INSTALL_DB, "--no-defaults", f"--datadir={self.datadir}", "--user=root",
             "--auth-root-authentication-method=normal", "--skip-test-db"],
            check=True, capture_output=True, timeout=120,
        )

    def start(self, timeout: float = 30.0) -> None:
        args = [
            MARIADBD, "--no-defaults", "--user=root", f"--datadir={self.datadir}",
            f"--port={self.port}", "--bind-address=127.0.0.1", f"--socket={self.base / 'mysqld.sock'}",
            f"--pid-file={self.base / 'mysqld.pid'}", f"--log-error={self.base / 'error.log'}",
            "--skip-log-bin", "--innodb-buffer-pool-size=32M", "--max-connections=60",
        ]
        if self.certs is not None:
            args += [f"--ssl-ca={self.certs.ca}", f"--ssl-cert={self.certs.server_cert}",
                     f"--ssl-key={self.certs.server_key}"]
            if self.require_tls:
                args.append("--require-secure-transport=ON")
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mariadbd exited with {self.proc.returncode}: {self.error_log()}")
            try:
                self.connect().close()
                return
            except pymysql.err.OperationalError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"mariadbd did not come up in {timeout} s: {self.error_log()}")

    def connect(self, database: str | None = None) -> pymysql.connections.Connection:
        ssl_args = {"ssl": {"ca": str(self.certs.ca)}} if self.certs is not None else {}
        return pymysql.connect(host="127.0.0.1", port=self.port, user="root", password="",
                               database=database, connect_timeout=2, **ssl_args)  # type: ignore[arg-type]

    def stop(self) -> None:
        """SIGTERM by PID, SIGKILL after 20 s."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def error_log(self) -> str:
        try:
            return (self.base / "error.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""
