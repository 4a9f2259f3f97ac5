"""kill -9 under concurrent load, on every backend (issue 10, "How it is tested"):
many publishers over real gRPC, the service (its own process) is killed mid-load and
started again. An answered publish is in the store or in the spool, which the
restart drains: not one answered message may be missing."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.e2e.backends import BackendUnderTest, MysqlBackend, RedisBackend, SqliteBackend
from tests.e2e.harness import free_port
from tests.e2e.plain_reads import store_key, stored_rows
from tests.hook_calls import is_ignore, message, new_id, publish_request, stub
from tests.service_proc import ServiceProcess, eventually, spool_ops, write_config

PUBLISHERS = 32
ANSWERED_BEFORE_KILL = 600


@pytest.fixture(params=["sqlite", "mysql", "redis"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BackendUnderTest]:
    made: BackendUnderTest = {"sqlite": lambda: SqliteBackend(tmp_path), "mysql": MysqlBackend,
                              "redis": RedisBackend}[request.param]()
    await made.setup()
    try:
        yield made
    finally:
        await made.teardown()


async def load(port: int, version: str, answered: list[Any], stop: asyncio.Event) -> None:
    """``PUBLISHERS`` publishers, each publishing as fast as it is answered, until
    ``stop`` or until the service goes away."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        hooks = stub(channel, version)

        async def publisher(n: int) -> None:
            i = 0
            while not stop.is_set():
                msg = message(version, new_id(), f"t/load/{n % 8}", f"{n}:{i}:".encode() + os.urandom(64),
                              sender=f"publisher-{n}")
                try:
                    answer = await hooks.OnMessagePublish(publish_request(version, msg), timeout=10)
                except grpc.aio.AioRpcError:
                    return  # killed: this call was never answered
                assert is_ignore(version, answer)
                answered.append(msg)
                i += 1

        await asyncio.gather(*(publisher(n) for n in range(PUBLISHERS)))


@pytest.mark.parametrize("version", ["v3", "v2"])
async def test_no_answered_message_is_lost_when_the_service_is_killed_under_load(
        backend: BackendUnderTest, version: str, tmp_path: Path) -> None:
    port, spool = free_port(), tmp_path / "spool.sqlite3"
    # a deadline this short sends part of the load to the spool: most runs are killed with ops in both
    config = write_config(tmp_path / "service.hocon", backend.hocon(["t/#"], 0, 100), port, free_port(), spool,
                          "publish_deadline = 5ms")
    service = ServiceProcess(config)
    answered: list[Any] = []
    stop = asyncio.Event()
    try:
        service.start()
        running = asyncio.create_task(load(port, version, answered, stop))
        await eventually(lambda: len(answered) >= ANSWERED_BEFORE_KILL or running.done(), 60, "load running")
        await service.akill9()  # mid-load: publishers are waiting for answers right now
        stop.set()
        await running
        assert len(answered) >= ANSWERED_BEFORE_KILL

        service.start()
        want = {store_key(backend, m.id): m for m in answered}

        async def missing() -> list[Any]:
            have = {r.key: r for r in await stored_rows(backend)}
            return [m for key, m in want.items()
                    if key not in have or (have[key].topic, have[key].payload) != (m.topic, m.payload)]

        async def all_there() -> bool:
            return spool_ops(spool) == 0 and not await missing()

        try:
            await eventually(all_there, 60, "every answered message in the store")
        except AssertionError:
            lost = await missing()
            raise AssertionError(f"{len(lost)} of {len(answered)} answered messages missing "
                                 f"(spool: {spool_ops(spool)} ops), e.g. {lost[:3]}") from None
        assert await service.asigterm() == 0
    finally:
        service.cleanup()
