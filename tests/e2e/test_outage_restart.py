"""A store outage across restarts of the service (issue 10, "How it is tested"): the
store dies (kill) or hangs (SIGSTOP), QoS 1 publishes are still answered within the
deadline (they go to the spool), acks arrive meanwhile, the service is stopped with
SIGTERM (exit 0: nothing lost), started again, killed with kill -9, started again,
and then the store comes back. Every answered message is in the store, the acked
ones are not (each ack applied after its save), and the spool is empty. The service
runs as its own process so the signals are real; the store is a server this test
owns, stopped by its PID."""

from __future__ import annotations

import asyncio
import os
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.e2e.backends import BackendUnderTest
from tests.e2e.harness import free_port
from tests.e2e.plain_reads import Row, store_key, stored_rows
from tests.e2e.test_outages import PrivateMysqlBackend, PrivateRedisBackend, RedisProcess
from tests.hook_calls import acked_request, is_ignore, message, new_id, publish_request, stub
from tests.mysql_tls import MariaDbServer
from tests.service_proc import ServiceProcess, eventually, spool_ops, write_config

VERSION = "v3"
DEADLINE_S = 0.3
SLACK_S = 1.5  # a loaded 2-core CI machine; a publish that waits for the store would take seconds


class StoreUnderTest:
    """A private store server and the ways to make it go away and come back."""

    backend: BackendUnderTest
    survives_kill: bool  # does the data survive a kill? (the private Redis keeps nothing on disk)

    def stop(self) -> None:
        raise NotImplementedError

    def back(self) -> None:
        raise NotImplementedError


class KilledRedis(StoreUnderTest):
    survives_kill = False

    def __init__(self, server: RedisProcess) -> None:
        self.server = server
        self.backend = PrivateRedisBackend(server.port)

    def stop(self) -> None:
        self.server.kill()

    def back(self) -> None:
        if self.server.proc is None:  # the fixture's teardown calls back() again
            self.server.start()


class HungStore(StoreUnderTest):
    """SIGSTOP: the server accepts connections (the kernel does) and answers nothing."""

    survives_kill = True

    def __init__(self, backend: BackendUnderTest, pid: int) -> None:
        self.backend = backend
        self.pid = pid

    def stop(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def back(self) -> None:
        os.kill(self.pid, signal.SIGCONT)


@pytest.fixture
def private_redis() -> Iterator[RedisProcess]:
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisProcess(Path(tmp))
        server.start()
        try:
            yield server
        finally:
            if server.proc is not None:
                os.kill(server.proc.pid, signal.SIGCONT)  # a stopped process would not die of SIGKILL's wait
            server.kill()


@pytest.fixture
def private_mariadb(tmp_path: Path) -> Iterator[MariaDbServer]:
    server = MariaDbServer(tmp_path / "mariadb", None)
    server.install()
    server.start()
    try:
        yield server
    finally:
        if server.proc is not None:
            os.kill(server.proc.pid, signal.SIGCONT)
        server.stop()


@pytest.fixture(params=["redis-killed", "mariadb-hung"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[StoreUnderTest]:
    kind = request.param
    if kind == "redis-killed":
        made: StoreUnderTest = KilledRedis(request.getfixturevalue("private_redis"))
    else:
        mariadb = request.getfixturevalue("private_mariadb")
        made = HungStore(PrivateMysqlBackend(mariadb), mariadb.proc.pid)
    await made.backend.setup()
    try:
        yield made
    finally:
        made.back()
        await made.backend.teardown()


class Publisher:
    """Publishes and acks over one gRPC channel to the service; remembers what was
    answered."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.answered: list[Any] = []
        self.acked: list[Any] = []

    async def publish(self, count: int, tag: str) -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            hooks = stub(channel, VERSION)
            for i in range(count):
                msg = message(VERSION, new_id(), f"t/outage/{i % 3}", f"{tag} {i}".encode() + os.urandom(8))
                started = time.monotonic()
                answer = await hooks.OnMessagePublish(publish_request(VERSION, msg), timeout=30)
                assert is_ignore(VERSION, answer)
                # answered by the deadline even though the store cannot take it
                assert time.monotonic() - started < DEADLINE_S + SLACK_S
                self.answered.append(msg)

    async def ack(self, messages: list[Any]) -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            hooks = stub(channel, VERSION)
            for msg in messages:
                await hooks.OnMessageAcked(acked_request(VERSION, msg), timeout=30)
                self.acked.append(msg)


def same(row: Row, msg: Any, backend: BackendUnderTest) -> bool:
    return (row.key, row.topic, row.payload, row.qos) == (store_key(backend, msg.id), msg.topic, msg.payload, 1)


async def test_answered_messages_survive_a_store_outage_across_sigterm_and_kill9(
        store: StoreUnderTest, tmp_path: Path) -> None:
    backend = store.backend
    port, spool = free_port(), tmp_path / "spool.sqlite3"
    block = backend.hocon(["t/#"], 0, 50)
    config = write_config(tmp_path / "service.hocon", block, port, free_port(), spool,
                          f"publish_deadline = {int(DEADLINE_S * 1000)}ms")
    service = ServiceProcess(config)
    pub = Publisher(port)
    try:
        service.start()
        await pub.publish(4, "before the outage")
        before = list(pub.answered)

        await asyncio.to_thread(store.stop)
        await pub.publish(12, "outage, first run")
        # acks given during the outage: of messages the store has, and of spooled ones
        await pub.ack([before[0], pub.answered[5], pub.answered[9]])
        assert await service.asigterm() == 0  # everything answered is in the store or the spool
        assert spool_ops(spool) > 0

        # a start-up without the store: it answers, spools behind what is waiting, and then crashes
        service.start()
        await pub.publish(6, "outage, second run")
        spooled = spool_ops(spool)
        await pub.ack([pub.answered[-1], pub.answered[6]])
        # an ack is answered at once and made durable just after: kill only once it is
        # (one the crash would catch in between costs a second delivery, never a message)
        await eventually(lambda: spool_ops(spool) == spooled + 2, 10, "the acks in the spool")
        await service.akill9()

        service.start()
        await asyncio.to_thread(store.back)

        lost_with_the_store = [] if store.survives_kill else before
        expected = [m for m in pub.answered if m not in pub.acked and m not in lost_with_the_store]
        gone = [m for m in pub.acked if m not in lost_with_the_store]

        async def store_is_right() -> bool:
            rows = await stored_rows(backend)
            keys = {r.key for r in rows}
            return (spool_ops(spool) == 0
                    and all(store_key(backend, m.id) not in keys for m in gone)
                    and all(any(same(r, m, backend) for r in rows) for m in expected))

        try:
            await eventually(store_is_right, 45, "the spool drained into the store, acks after their saves")
        except AssertionError:
            assert service.stderr is not None
            rows = await stored_rows(backend)
            want = {store_key(backend, m.id) for m in expected}
            extra = [r for r in rows if r.key not in want]
            acked = [m.payload for m in pub.acked]
            raise AssertionError(f"spool: {spool_ops(spool)} ops; stored {len(rows)}, expected {len(expected)}; "
                                 f"extra {extra}, acked {acked}"
                                 f"logs of the runs: {service.logs} {service.stderr.seen}") from None
        rows = await stored_rows(backend)
        assert sorted(r.key for r in rows) == sorted(store_key(backend, m.id) for m in expected)
        assert await service.asigterm() == 0
    finally:
        service.cleanup()
    text = "\n".join(service.logs)
    assert "Traceback" not in text, text[-5000:]
    if isinstance(store, HungStore):
        # the runs that started with the store hung served the broker before giving up on it
        for run in service.logs[1:]:
            assert "event=store_open_slow" in run
            unreachable = run.find("unreachable at start-up")
            assert unreachable == -1 or run.index("listening on") < unreachable, run
