"""Start-up as an operator sees it: every expected failure is one critical line naming
the field, exit status 2, no traceback (a store that cannot be opened is retried instead,
its reason on /readyz); what is valid but suspicious is a warning line."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from exhook.config import load_config_string
from exhook.server import Service
from tests.e2e.harness import free_port

ROOT = Path(__file__).resolve().parent.parent


def start(tmp_path: Path, exhook: str, sqlite_path: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the service on ``exhook { ... }`` until it exits (it is expected to fail at start)."""
    config = tmp_path / "c.hocon"
    path = sqlite_path or f"{tmp_path}/db.sqlite3"
    config.write_text(f'exhook {{ workers = 1, http {{ listen = "127.0.0.1:{free_port()}" }}, {exhook} }}\n'
                      f'sqlite {{ enable = true, path = "{path}", topics = ["t/#"] }}\n')
    return subprocess.run([sys.executable, "-m", "exhook", "--config", str(config)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def one_critical_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    # every line is ours (key=value), none printed by gRPC's C core
    assert all(line.startswith("ts=") for line in done.stderr.splitlines()), done.stderr
    [critical] = [line for line in done.stderr.splitlines() if "level=critical" in line]
    return critical


def test_a_taken_grpc_port_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = start(tmp_path, f'listen = "127.0.0.1:{port}"')
    line = one_critical_line(done)
    assert f'msg="exhook.listen: cannot listen on 127.0.0.1:{port}: Address already in use"' in line


def test_an_unresolvable_grpc_host_is_one_line(tmp_path: Path) -> None:
    line = one_critical_line(start(tmp_path, 'listen = "nohost.invalid:9000"'))
    assert "msg=\"exhook.listen: cannot resolve 'nohost.invalid': " in line


async def test_an_sqlite_directory_that_cannot_be_made_names_sqlite_path(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A store that cannot be opened is retried in the background (the broker needs answers);
    the reason, naming the field and the absolute path, is on /readyz and in one log line."""
    path = "/proc/offline-exhook-no-such-dir/db.sqlite3"  # /proc takes no new directories, not even from root
    cfg = load_config_string(f'exhook {{ listen = "127.0.0.1:{free_port()}", http.enable = false, '
                             f'spool.path = "{tmp_path}/spool" }}\n'
                             f'sqlite {{ enable = true, path = "{path}", topics = ["t/#"] }}\n')
    service = Service(cfg)
    await service.start()
    try:
        [store] = [why for why in service.readiness.failing() if why.startswith("store: ")]
        assert f"sqlite.path: {path}: " in store
        [line] = [r for r in caplog.records if getattr(r, "event", "") == "store_unreachable"]
        assert line.error.startswith(f"sqlite.path: {path}: ") and line.exc_info is None
    finally:
        await service.stop()


def test_an_empty_api_key_is_a_warning_line_at_start(tmp_path: Path) -> None:
    with socket.socket() as taken:  # the service stops right after its warnings: a taken port
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        done = start(tmp_path, f'listen = "127.0.0.1:{taken.getsockname()[1]}", emqx {{ api_key = "" }}')
    one_critical_line(done)
    warnings = [line for line in done.stderr.splitlines() if "event=config_warning" in line]
    assert len(warnings) == 1 and "level=warning" in warnings[0]
    assert 'msg="config: exhook.emqx.api_key is empty: EMQX refuses replays and restores (401)' in warnings[0]
