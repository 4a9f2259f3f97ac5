"""The SIGTERM contract and the gRPC port (issue 10 items 3 and 5), with the service
as its own process: SIGTERM during a replay lets the replay finish while gRPC still
answers the replay's own publishes, then the service exits 0; a second service
binding the same ``listen`` address fails with one critical line and exit status 2,
alone or with workers."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.cli_run import ROOT
from tests.e2e.backends import SqliteBackend
from tests.e2e.harness import free_port
from tests.emulator import EmqxEmulator
from tests.emulator.rest import RestApi
from tests.hook_calls import is_ignore, message, new_id, publish_request, stub
from tests.service_proc import ServiceProcess, eventually, write_config

MESSAGES = 240
BATCH = 20
REST_DELAY_S = 0.15  # per publish/bulk: the replay takes a few tenths of the shutdown grace
KEY, SECRET = "reliability", "reliability-secret-value"


def slow_bulk(monkeypatch: pytest.MonkeyPatch) -> None:
    """The broker's REST API answers publish/bulk slowly, so the replay is still
    running when the service is told to stop."""
    original = RestApi._publish_bulk

    async def slow(self: RestApi, request: Any, body: Any) -> tuple[int, Any]:
        await asyncio.sleep(REST_DELAY_S)
        return await original(self, request, body)

    monkeypatch.setattr(RestApi, "_publish_bulk", slow)


async def store_messages(port: int, count: int) -> list[bytes]:
    payloads = [f"replayed {i}".encode() for i in range(count)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        hooks = stub(channel, "v3")
        for start in range(0, count, 40):
            answers = await asyncio.gather(*(
                hooks.OnMessagePublish(publish_request("v3", message("v3", new_id(), "t/replay", p)), timeout=30)
                for p in payloads[start:start + 40]))
            assert all(is_ignore("v3", a) for a in answers)
    return payloads


async def test_sigterm_lets_a_running_replay_finish_then_exits_0(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    slow_bulk(monkeypatch)
    port, rest_port = free_port(), free_port()
    block = SqliteBackend(tmp_path).hocon(["t/#"], 0, 50)
    config = write_config(tmp_path / "service.hocon", block, port, free_port(), tmp_path / "spool.sqlite3",
                          f'replay_batch_size = {BATCH}, emqx {{ api_url = "http://127.0.0.1:{rest_port}" }}')
    service = ServiceProcess(config)
    service.start()
    emu = EmqxEmulator(f"127.0.0.1:{port}", "v3", api_key=KEY, api_secret=SECRET, rest_port=rest_port,
                       request_timeout=10)
    try:
        payloads = await store_messages(port, MESSAGES)
        await emu.start()
        sub = emu.client("subscriber")
        await sub.connect()
        await sub.subscribe("t/replay", qos=1)
        await eventually(lambda: emu.rest_bodies("/publish/bulk"), 30, "the replay begun", every=0.01)
        stopped_at = time.monotonic()
        stopping = asyncio.create_task(service.asigterm())

        deliveries = await sub.wait_for_deliveries(MESSAGES, timeout=30)
        assert sorted(d.payload for d in deliveries) == sorted(payloads)
        assert await stopping == 0
        bulks = [r for r in emu.rest_requests if r.path == "/publish/bulk"]
        assert sum(len(r.body) for r in bulks) == MESSAGES and all(r.status == 200 for r in bulks)
        assert any(r.started > stopped_at for r in bulks)  # the replay went on after SIGTERM...
        replays = [c for c in emu.calls_of("message.publish") if getattr(c.request.message, "from") == "http_api"]
        assert len(replays) == MESSAGES
        assert all(c.status == "ok" for c in replays)  # ...and gRPC answered each of its publishes
        assert not emu.errors, emu.errors
    finally:
        await emu.stop()
        service.cleanup()
    assert "Traceback" not in service.logs[-1]


def critical_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "level=critical" in line]


@pytest.mark.parametrize("workers", [1, 2])
def test_a_second_service_on_the_same_grpc_address_fails_with_one_line_and_exit_2(
        tmp_path: Path, workers: int) -> None:
    port = free_port()

    def config(name: str) -> Path:
        block = SqliteBackend(tmp_path / name).hocon(["t/#"], 0, 50)
        (tmp_path / name).mkdir()
        return write_config(tmp_path / f"{name}.hocon", block, port, free_port(), tmp_path / name / "spool",
                            f"workers = {workers}")

    first = ServiceProcess(config("first"))
    try:
        first.start()
        if workers > 1:
            assert first.stderr is not None
            first.stderr.wait_for("listening on", workers)
        second = subprocess.run([sys.executable, "-m", "exhook", "--config", str(config("second"))], cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == 2, second.stderr
        lines = critical_lines(second.stderr)
        assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0], second.stderr
        assert "Traceback" not in second.stderr
        # the first one still has the port, alone
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            for _ in range(4 * workers):  # new connections: each worker would get some
                answer = stub(channel, "v3").OnMessagePublish(
                    publish_request("v3", message("v3", new_id(), "t/still", b"x")), timeout=10)
                assert is_ignore("v3", answer)
        assert first.sigterm() == 0
    finally:
        first.cleanup()
