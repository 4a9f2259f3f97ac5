"""What another writer of the store can leave there (the Erlang plugin keeps qos as
text, an operator edits a hash or a row) must not cost a client its replays or its other
subscriptions: the emulated EMQX refuses a qos outside 0-2 with 400 for the whole
publish/bulk or subscribe/bulk array, as EMQX does (tests/emulator/rest.py)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from tests.e2e.backends import RedisBackend, SqliteBackend
from tests.e2e.harness import Harness
from tests.e2e.test_scenarios import payloads, publish_all


@pytest.fixture
async def redis_h(version: str, tmp_path: Path) -> Harness:  # type: ignore[misc]
    h = Harness(RedisBackend(), version)
    await h.start()
    yield h
    await h.stop()
    assert h.emu is None or not h.emu.errors, h.emu.errors


async def set_stored_qos(backend: RedisBackend, payload: bytes, qos: bytes) -> None:
    for key in [k async for k in backend.client.scan_iter(match=f"{backend.msg_prefix}:*", count=1000)]:
        if await backend.client.type(key) == b"hash" and await backend.client.hget(key, "payload") == payload:
            await backend.client.hset(key, "qos", qos)
            return
    raise AssertionError(f"no stored message with payload {payload!r}")


async def test_a_bad_stored_qos_skips_that_message_and_that_subscription_only(redis_h: Harness) -> None:
    h, backend = redis_h, redis_h.backend
    assert isinstance(backend, RedisBackend)
    sub = h.client("rr-sub")
    await sub.connect()
    await sub.subscribe("t/rr", qos=1)
    await sub.disconnect()
    await h.settle()
    await backend.client.hset(f"{backend.sub_prefix}:rr-sub", "t/other", "3")
    await publish_all(h, [("t/rr", b"m1"), ("t/rr", b"m2"), ("t/rr", b"m3")])
    await set_stored_qos(backend, b"m2", b"3")

    await sub.connect()  # a clean session: the service restores t/rr and replays it
    await sub.wait_for_deliveries(2, timeout=10)
    await h.settle()
    assert payloads(sub) == [b"m1", b"m3"]
    metrics = h.service.metrics
    assert metrics.sample("restore_subscriptions_skipped_total", reason="bad_qos") == 1
    assert metrics.sample("replay_messages_skipped_total", reason="bad_qos") == 1
    assert metrics.sample("replay_failures_total") == 0
    assert h.emu is not None
    assert not [r for r in h.emu.rest_requests if r.status == 400]  # nothing EMQX had to refuse was sent


async def test_a_stored_row_that_is_no_message_is_skipped_and_counted(version: str, tmp_path: Path) -> None:
    # another tool wrote a qos that is no number into the SQLite store: the reader skips that row,
    # the other messages of the topic are replayed, the metric says one was left out
    backend = SqliteBackend(tmp_path)
    h = Harness(backend, version)
    await h.start()
    try:
        sub = h.client("rr-sub2")
        await sub.connect()
        await sub.subscribe("t/rr2", qos=1)
        await sub.disconnect()
        await publish_all(h, [("t/rr2", b"m1"), ("t/rr2", b"m2"), ("t/rr2", b"m3")])
        await h.settle()
        with sqlite3.connect(backend.path) as conn:
            assert conn.execute("UPDATE mqtt_msg SET qos = 'one' WHERE payload = ?", (b"m2",)).rowcount == 1
        await sub.connect()
        await sub.wait_for_deliveries(2, timeout=10)
        await h.settle()
        assert payloads(sub) == [b"m1", b"m3"]
        assert h.service.metrics.sample("replay_messages_skipped_total", reason="unreadable") == 1
        assert h.service.metrics.sample("replay_failures_total") == 0
    finally:
        await h.stop()
