"""A stderr that nobody reads does not stop the service answering the broker.

The service's log goes to stderr, usually a pipe to a container runtime or journald.
When that reader stalls, the pipe fills and a write to it blocks. The service runs as
its own process here with its stderr pipe shrunk to one page and left unread after
start-up: its lines pile up in its log writer's queue while the event loop goes on
answering hooks, restoring and replaying. Once the pipe is read again, every line
arrives.
"""

from __future__ import annotations

import asyncio
import fcntl
import subprocess
import sys
from pathlib import Path

from tests.cli_run import ROOT
from tests.e2e.backends import SqliteBackend
from tests.e2e.harness import free_port
from tests.emulator import EmqxEmulator
from tests.service_proc import StderrLines, write_config

KEY, SECRET = "reliability", "reliability-secret-value"
CLIENTS = 40  # each restore and replay logs two lines of ~200 bytes: far beyond one page


def start_service(config: Path) -> subprocess.Popen[str]:
    """The service with a stderr pipe of one page (4 KiB, the least Linux allows)."""
    proc = subprocess.Popen([sys.executable, "-m", "exhook", "--config", str(config)], cwd=ROOT,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    fcntl.fcntl(proc.stderr.fileno(), fcntl.F_SETPIPE_SZ, 4096)
    return proc


async def read_until(proc: subprocess.Popen[str], needle: str, timeout: float = 60) -> list[str]:
    """stderr lines up to the one holding ``needle``; nothing more is read."""
    assert proc.stderr is not None
    lines: list[str] = []
    while not lines or needle not in lines[-1]:
        line = await asyncio.wait_for(asyncio.to_thread(proc.stderr.readline), timeout)
        assert line, "".join(lines)
        lines.append(line)
    return lines


async def test_hooks_are_answered_while_stderr_is_not_read(tmp_path: Path) -> None:
    port, rest_port, http_port = free_port(), free_port(), free_port()
    backend = SqliteBackend(tmp_path)
    config = write_config(tmp_path / "service.hocon", backend.hocon(["t/#"], 0, 10), port, http_port,
                          tmp_path / "spool.sqlite3", f'emqx {{ api_url = "http://127.0.0.1:{rest_port}" }}')
    proc = start_service(config)
    emu = EmqxEmulator(f"127.0.0.1:{port}", "v3", api_key=KEY, api_secret=SECRET, rest_port=rest_port,
                       request_timeout=2.0, failed_action="ignore", emqx_version="5.10.4")
    try:
        await read_until(proc, "listening on")
        await emu.start()
        subs = [emu.client(f"stalled-{i}", clean_start=True) for i in range(CLIENTS)]
        for i, sub in enumerate(subs):
            await sub.connect()
            await sub.subscribe(f"t/{i}", qos=1)
            await sub.disconnect()
        publisher = emu.client("publisher")
        await publisher.connect()
        for i in range(CLIENTS):
            await publisher.publish(f"t/{i}", f"for {i}".encode(), qos=1)

        for sub in subs:  # each connect logs a restore and a replay while nobody reads stderr
            await sub.connect()
        for i, sub in enumerate(subs):
            deliveries = await sub.wait_for_deliveries(1, timeout=30)
            assert [d.payload for d in deliveries] == [f"for {i}".encode()]
        await emu.settle()
        failed = [(c.hook, c.key, c.status) for c in emu.hooks.calls if c.status != "ok"]
        assert failed == []

        stderr = StderrLines(proc)  # the reader is back: the queued lines follow
        stderr.wait_for("replayed stored messages", count=CLIENTS)
        assert "log lines dropped" not in "".join(stderr.seen)
    finally:
        await emu.stop()
        proc.kill()
        proc.wait()
