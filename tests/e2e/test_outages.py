"""The store goes away: message.publish is still answered within its deadline,
failures are counted, and the service recovers when the store returns."""

from __future__ import annotations

import asyncio
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from exhook import later_retries
from storage.retry import Backoff
from tests.e2e.backends import MysqlBackend, RedisBackend
from tests.e2e.harness import Harness, free_port
from tests.mysql_tls import MariaDbServer
from tests.service_proc import eventually

DEADLINE_S = 0.3
# generous slack for a loaded CI machine; a hang would be the emulator's 5 s timeout
SLACK_S = 1.0


class RedisProcess:
    """A redis-server this test owns, so it can kill it and start it again on the same port."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self.proc is not None:  # a second start would orphan the first server
            raise RuntimeError(f"redis-server on port {self.port} is already running")
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            ping = subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True)
            if ping.stdout.strip() == b"PONG":
                return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture
def redis_process() -> Iterator[RedisProcess]:
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisProcess(Path(tmp))
        try:
            yield server
        finally:
            server.kill()


class PrivateRedisBackend(RedisBackend):
    def __init__(self, port: int) -> None:
        super().__init__()
        self.port = port
        self.client = aioredis.Redis(host="127.0.0.1", port=port)

    def hocon(self, topics: list[str], message_ttl: int, batch_size: int) -> str:
        return super().hocon(topics, message_ttl, batch_size).replace("127.0.0.1:6379", f"127.0.0.1:{self.port}")

    async def teardown(self) -> None:
        await self.client.aclose()


def publish_latencies(h: Harness) -> list[float]:
    assert h.emu is not None
    return [c.latency for c in h.emu.calls_of("message.publish") if c.latency is not None]


@pytest.mark.parametrize("version", ["v3", "v2"])
async def test_redis_down_at_start_up_then_back(redis_process: RedisProcess, version: str) -> None:
    h = Harness(PrivateRedisBackend(redis_process.port), version, publish_deadline=f"{int(DEADLINE_S * 1000)}ms")
    await h.start()  # Redis is not running: the service starts anyway
    try:
        pub = h.client("pub")
        await pub.connect()
        for i in range(3):
            await pub.publish("t/outage", f"early{i}".encode(), qos=1)
        assert max(publish_latencies(h)) < DEADLINE_S + SLACK_S
        assert h.service.metrics.sample("publish_deadline_answers_total", reason="store_slow") == 3

        redis_process.start()
        await pub.publish("t/outage", b"after", qos=1)
        await h.settle()
        # the early messages stayed queued and were written once Redis came back
        assert await h.backend.count_messages() == 4
        sub = h.client("sub")
        await sub.connect()
        await sub.subscribe("t/outage", qos=1)
        await sub.wait_for_deliveries(4, timeout=10)
        assert [d.payload for d in sub.deliveries] == [b"early0", b"early1", b"early2", b"after"]
    finally:
        await h.stop()


async def test_redis_down_mid_run_then_back(redis_process: RedisProcess) -> None:
    redis_process.start()
    h = Harness(PrivateRedisBackend(redis_process.port), "v3", publish_deadline=f"{int(DEADLINE_S * 1000)}ms")
    await h.start()
    try:
        pub = h.client("pub")
        await pub.connect()
        await pub.publish("t/mid", b"before", qos=1)
        assert h.service.metrics.sample("messages_stored_total") == 1

        redis_process.kill()
        started = time.monotonic()
        for i in range(4):
            await pub.publish("t/mid", f"during{i}".encode(), qos=1)
        assert time.monotonic() - started < 4 * (DEADLINE_S + SLACK_S)
        assert max(publish_latencies(h)) < DEADLINE_S + SLACK_S
        assert h.service.metrics.sample("publish_deadline_answers_total", reason="store_slow") >= 4
        assert h.service.metrics.sample("store_failures_total", operation="write") >= 1

        redis_process.start()  # an empty Redis: what was queued gets written now
        await h.settle()
        assert await h.backend.count_messages() == 4
        await pub.publish("t/mid", b"recovered", qos=1)
        await h.settle()
        assert await h.backend.count_messages() == 5
    finally:
        await h.stop()


class PrivateMysqlBackend(MysqlBackend):
    def __init__(self, server: MariaDbServer) -> None:
        super().__init__()
        self.server = server

    def hocon(self, topics: list[str], message_ttl: int, batch_size: int) -> str:
        return super().hocon(topics, message_ttl, batch_size).replace("127.0.0.1:3306",
                                                                       f"127.0.0.1:{self.server.port}")

    async def _query(self, sql: str, database: str | None = None) -> int:
        def run() -> int:
            conn = self.server.connect(database)
            try:
                with conn.cursor() as cur:
                    cur.execute(sql)
                    row = cur.fetchone()
                    conn.commit()
                    return int(row[0]) if row else 0
            finally:
                conn.close()
        return await asyncio.to_thread(run)


@pytest.fixture(scope="module")
def mariadb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MariaDbServer]:
    server = MariaDbServer(tmp_path_factory.mktemp("mariadb-outage"), None)
    server.install()
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_mariadb_stopped_mid_run_then_back(mariadb: MariaDbServer) -> None:
    h = Harness(PrivateMysqlBackend(mariadb), "v3", batch_size=10,
                publish_deadline=f"{int(DEADLINE_S * 1000)}ms")
    await h.start()
    try:
        pub = h.client("pub")
        await pub.connect()
        await pub.publish("t/db", b"before", qos=1)
        assert h.service.metrics.sample("messages_stored_total") == 1

        await asyncio.to_thread(mariadb.stop)
        for i in range(4):
            await pub.publish("t/db", f"during{i}".encode(), qos=1)
        assert max(publish_latencies(h)) < DEADLINE_S + SLACK_S
        assert h.service.metrics.sample("publish_deadline_answers_total", reason="store_slow") >= 4
        assert h.service.metrics.sample("store_failures_total", operation="write") >= 1

        await asyncio.to_thread(mariadb.start)
        await h.settle()
        await pub.publish("t/db", b"recovered", qos=1)
        await h.settle()
        assert await h.backend.count_messages() == 6
        sub = h.client("sub")
        await sub.connect()
        await sub.subscribe("t/db", qos=1)
        await sub.wait_for_deliveries(6, timeout=15)
        assert [d.payload for d in sub.deliveries] == [
            b"before", b"during0", b"during1", b"during2", b"during3", b"recovered"]
    finally:
        await h.stop()


async def kill_keeping_its_data(h: Harness, redis_process: RedisProcess) -> PrivateRedisBackend:
    """Stop the test's redis-server after a dump: started again, it has what it had."""
    backend = h.backend
    assert isinstance(backend, PrivateRedisBackend)
    await backend.client.save()
    redis_process.kill()
    return backend


async def test_subscription_writes_wait_for_the_store_however_long_it_is_down(
        redis_process: RedisProcess, caplog: pytest.LogCaptureFixture) -> None:
    # A subscribe and an unsubscribe answered while the store is down are written when
    # it is back, however long that takes (they used to be given up after four tries):
    # the client's next connect restores what it had subscribed, not what it dropped.
    redis_process.start()
    h = Harness(PrivateRedisBackend(redis_process.port), "v3", publish_deadline=f"{int(DEADLINE_S * 1000)}ms")
    await h.start()
    try:
        sub = h.client("waiting-sub")
        await sub.connect()
        await sub.subscribe("t/keep", qos=1)
        await h.settle()
        assert await h.backend.count_subscriptions() == 1
        backend = await kill_keeping_its_data(h, redis_process)  # back with t/keep still stored

        await sub.unsubscribe("t/keep")
        await sub.subscribe("t/new", qos=1)

        def failures(operation: str) -> float:
            return h.service.metrics.sample("store_failures_total", operation=operation) or 0.0

        def past_the_old_retries() -> bool:  # four tries was where it gave up (the subscribe waits behind it)
            return failures("delete_subscription") >= 5

        await eventually(past_the_old_retries, 30, "subscription writes failing while Redis is down")
        waits = [r.getMessage() for r in caplog.records if getattr(r, "event", "") == "subscription_write_waits"]
        assert waits and waits[0].startswith("delete subscription waits for the store, tried again until it works: ")
        assert len(waits) <= 2  # one line a minute per operation, not one per try

        redis_process.start()

        async def stored_filters() -> list[bytes]:
            return sorted(await backend.client.hkeys(f"{backend.sub_prefix}:waiting-sub"))

        async def written() -> bool:
            return await stored_filters() == [b"t/new"]

        await eventually(written, 30, "the subscription writes once Redis is back")
        await sub.disconnect()
        pub = h.client("waiting-pub")
        await pub.connect()
        await pub.publish("t/keep", b"dropped filter", qos=1)
        await pub.publish("t/new", b"kept filter", qos=1)
        await h.settle()
        await sub.connect()
        await sub.wait_for_deliveries(1, timeout=10)
        await h.settle()
        assert [(d.topic, d.payload) for d in sub.deliveries] == [("t/new", b"kept filter")]
    finally:
        await h.stop()


async def test_a_restore_an_outage_made_fail_is_tried_again_once_the_store_is_back(
        redis_process: RedisProcess, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # The store is down when a client connects: its restore gives up after its quick
    # retries. The client stays connected; once the store is back, the restore is tried
    # again (not only at the client's next connect) and replays what it missed, once.
    monkeypatch.setattr(later_retries, "LATER", Backoff(base=1.0, cap=1.0))
    redis_process.start()
    h = Harness(PrivateRedisBackend(redis_process.port), "v3", publish_deadline=f"{int(DEADLINE_S * 1000)}ms")
    await h.start()
    try:
        sub = h.client("later-sub")
        await sub.connect()
        await sub.subscribe("t/later", qos=1)
        await sub.disconnect()
        pub = h.client("later-pub")
        await pub.connect()
        await pub.publish("t/later", b"missed", qos=1)
        await h.settle()
        await kill_keeping_its_data(h, redis_process)  # back with the subscription and the message

        await sub.connect()  # clean session: restored from the store, which is down
        metrics = h.service.metrics

        def restore_given_up() -> bool:
            return metrics.sample("store_failures_total", operation="fresh_session_subscriptions") >= 4

        await eventually(restore_given_up, 30, "the restore failing while Redis is down")
        assert sub.deliveries == []
        redis_process.start()
        await sub.wait_for_deliveries(1, timeout=30)
        await h.settle()
        assert [(d.topic, d.payload) for d in sub.deliveries] == [("t/later", b"missed")]
        assert metrics.sample("client_jobs_retry_waiting") == 0
        assert any(r.getMessage().startswith("restore failed: tried again in ") for r in caplog.records)
    finally:
        await h.stop()
