"""Both connect hooks lost is not a lost client (issue 14): the broker gives up on a
fresh session's ``session.created`` and ``client.connected`` while the calls wait in
the service's gRPC server, whose handlers then never run. The service notices the
calls it never handled and restores the client from EMQX's list of fresh sessions.

The service runs as its own process so that it can be frozen (SIGSTOP) while the
client connects: the calls reach its socket, the broker times them out and carries
on (``failed_action = ignore``), and when the service runs again grpc finds them
cancelled, exactly as in a storm that outruns one process.
"""

from __future__ import annotations

import asyncio
import os
import signal
import urllib.request
from pathlib import Path

import pytest

from tests.e2e.backends import SqliteBackend
from tests.e2e.harness import free_port
from tests.emulator import EmqxEmulator
from tests.service_proc import ServiceProcess, eventually, write_config

KEY, SECRET = "reliability", "reliability-secret-value"
REQUEST_TIMEOUT_S = 0.4


def metric(http_port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(f"offline_exhook_{name} "):
                return float(line.split()[1])
    return 0.0


@pytest.mark.parametrize("version", ["v3", "v2"])
async def test_a_client_whose_connect_hooks_both_timed_out_is_restored_and_replayed_once(
        tmp_path: Path, version: str) -> None:
    port, rest_port, http_port = free_port(), free_port(), free_port()
    backend = SqliteBackend(tmp_path)
    config = write_config(tmp_path / "service.hocon", backend.hocon(["t/#"], 0, 10), port, http_port,
                          tmp_path / "spool.sqlite3", f'emqx {{ api_url = "http://127.0.0.1:{rest_port}" }}')
    service = ServiceProcess(config)
    service.start()
    # v2 plays EMQX 5.3 (no peer port in hook calls), v3 plays EMQX 5.10
    emu = EmqxEmulator(f"127.0.0.1:{port}", version, api_key=KEY, api_secret=SECRET, rest_port=rest_port,
                       request_timeout=REQUEST_TIMEOUT_S, failed_action="ignore")
    try:
        await emu.start()
        sub = emu.client("lost-both", clean_start=True)
        await sub.connect()
        await sub.subscribe("t/lost", qos=1)
        await sub.disconnect()
        publisher = emu.client("publisher")
        await publisher.connect()
        await publisher.publish("t/lost", b"while away", qos=1)
        await emu.settle()
        await eventually(backend.count_messages, 10, "the message stored")

        assert service.proc is not None
        pid = service.proc.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            await sub.connect()  # both connect hooks time out; the broker connects the client anyway
        finally:
            os.kill(pid, signal.SIGCONT)
        connect_statuses = [c.status for c in emu.hooks.calls
                            if c.key == "lost-both" and c.hook in ("session.created", "client.connected")]
        assert connect_statuses[-2:] == ["timeout", "timeout"]

        try:
            deliveries = await sub.wait_for_deliveries(1, timeout=20)
        except TimeoutError:
            assert service.stderr is not None
            service.stderr.wait_for("NEVER", timeout=1)
            raise
        assert [d.payload for d in deliveries] == [b"while away"]
        async def store_empty() -> bool:
            return await backend.count_messages() == 0

        await eventually(store_empty, 10, "the replayed message acked and deleted")
        await emu.settle()
        await asyncio.sleep(1.5)  # a second sweep or a late restore would replay it again now
        assert len(sub.deliveries) == 1
        restores = [r for r in emu.rest_requests if r.path == "/clients/lost-both/subscribe/bulk"]
        assert [r.status for r in restores] == [200]
        assert metric(http_port, "connect_calls_lost_total") == 2
        assert metric(http_port, "missed_connect_restores_total") == 1
        assert service.stderr is not None
        service.stderr.wait_for("connect hook calls reached the service after the broker gave up")
    finally:
        await emu.stop()
        service.cleanup()
