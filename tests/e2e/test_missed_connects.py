"""Both connect hooks lost is not a lost client (issue 14): the broker gives up on a
fresh session's ``session.created`` and ``client.connected`` while the calls wait in
the service's gRPC server, whose handlers then never run. The service notices that
its event loop stalled and restores the client from EMQX's list of fresh sessions
(EMQX 5.4+, which sends peer ports; on 5.3 the client is restored at its next connect).

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
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.backends import SqliteBackend
from tests.e2e.harness import free_port
from tests.emulator import EmqxEmulator
from tests.service_proc import ServiceProcess, eventually, write_config

KEY, SECRET = "reliability", "reliability-secret-value"
REQUEST_TIMEOUT_S = 0.4


def metric(http_port: int, sample: str) -> float:
    """One sample of the service's /metrics, e.g. ``name{label="value"}``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(f"offline_exhook_{sample} "):
                return float(line.split()[-1])
    return 0.0


@dataclass
class Rig:
    service: ServiceProcess
    emu: EmqxEmulator
    backend: SqliteBackend
    http_port: int


@asynccontextmanager
async def service_and_broker(tmp_path: Path, version: str, emqx_version: str) -> AsyncIterator[Rig]:
    """The service as its own process (SQLite) and the emulated broker in front of it,
    which gives up on a hook call after ``REQUEST_TIMEOUT_S`` and carries on (the
    service is told so: a stall of a quarter of it is one to look into)."""
    port, rest_port, http_port = free_port(), free_port(), free_port()
    backend = SqliteBackend(tmp_path)
    config = write_config(tmp_path / "service.hocon", backend.hocon(["t/#"], 0, 10), port, http_port,
                          tmp_path / "spool.sqlite3", f'emqx {{ api_url = "http://127.0.0.1:{rest_port}", '
                          f'hook_timeout = {int(REQUEST_TIMEOUT_S * 1000)}ms }}')
    service = ServiceProcess(config)
    service.start()
    emu = EmqxEmulator(f"127.0.0.1:{port}", version, api_key=KEY, api_secret=SECRET, rest_port=rest_port,
                       request_timeout=REQUEST_TIMEOUT_S, failed_action="ignore", emqx_version=emqx_version)
    try:
        await emu.start()
        yield Rig(service, emu, backend, http_port)
    finally:
        await emu.stop()
        service.cleanup()


async def returning_client(emu: EmqxEmulator, backend: SqliteBackend):  # type: ignore[no-untyped-def]
    """A client with a stored subscription that went away, and a message stored for it."""
    sub = emu.client("lost-both", clean_start=True)
    await sub.connect()
    await sub.subscribe("t/lost", qos=1)
    await sub.disconnect()
    publisher = emu.client("publisher")
    await publisher.connect()
    await publisher.publish("t/lost", b"while away", qos=1)
    await emu.settle()
    await eventually(backend.count_messages, 10, "the message stored")
    return sub


async def connect_while_frozen(service: ServiceProcess, emu: EmqxEmulator, sub) -> None:  # type: ignore[no-untyped-def]
    """Connect ``sub`` while the service is stopped: both connect hooks reach its socket and
    time out; the broker connects the client anyway."""
    assert service.proc is not None
    pid = service.proc.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        await sub.connect()
    finally:
        os.kill(pid, signal.SIGCONT)
    connect_statuses = [c.status for c in emu.hooks.calls
                        if c.key == "lost-both" and c.hook in ("session.created", "client.connected")]
    assert connect_statuses[-2:] == ["timeout", "timeout"]


@pytest.mark.parametrize(("version", "emqx_version"), [("v3", "5.10.4"), ("v2", "5.8.0")])
async def test_a_client_whose_connect_hooks_both_timed_out_is_restored_and_replayed_once(
        tmp_path: Path, version: str, emqx_version: str) -> None:
    # EMQX 5.4+ sends the peer port in hook calls (v2 and v3 alike)
    async with service_and_broker(tmp_path, version, emqx_version) as rig:
        service, emu, backend = rig.service, rig.emu, rig.backend
        sub = await returning_client(emu, backend)
        await connect_while_frozen(service, emu, sub)

        # a stall from 0.1 s on (a quarter of hook_timeout), a sweep once connects are
        # quiet for 2 s: a service that kept EMQX's default 5 s would not count this stall
        deliveries = await sub.wait_for_deliveries(1, timeout=8)
        assert [d.payload for d in deliveries] == [b"while away"]

        async def store_empty() -> bool:
            return await backend.count_messages() == 0

        await eventually(store_empty, 10, "the replayed message acked and deleted")
        await emu.settle()
        await asyncio.sleep(1.5)  # a second sweep or a late restore would replay it again now
        assert len(sub.deliveries) == 1
        restores = [r for r in emu.rest_requests if r.path == "/clients/lost-both/subscribe/bulk"]
        assert [r.status for r in restores] == [200]
        assert metric(rig.http_port, "loop_stalls_total") >= 1
        assert metric(rig.http_port, "missed_connect_restores_total") == 1
        assert service.stderr is not None
        service.stderr.wait_for("the broker may have given up on connect hook calls")


async def test_on_emqx_5_3_a_client_that_lost_both_connect_hooks_is_restored_at_its_next_connect(
        tmp_path: Path) -> None:
    # EMQX 5.3 sends no peer port: the sweep cannot tell this connection's replay marks
    # from the last one's, so it does not run; the message stays stored for the next connect
    async with service_and_broker(tmp_path, "v2", "5.3.2") as rig:
        service, emu, backend = rig.service, rig.emu, rig.backend
        sub = await returning_client(emu, backend)
        await connect_while_frozen(service, emu, sub)
        assert service.stderr is not None
        service.stderr.wait_for("this broker sends no peer port", timeout=30)
        assert sub.deliveries == [] and await backend.count_messages() == 1
        assert not [r for r in emu.rest_requests if r.path == "/clients/lost-both/subscribe/bulk"]

        await sub.disconnect()
        await sub.connect()
        deliveries = await sub.wait_for_deliveries(1, timeout=10)
        assert [d.payload for d in deliveries] == [b"while away"]
