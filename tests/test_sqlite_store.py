"""SqliteStore against real SQLite files (one per test, under tmp_path)."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import threading
import time
import tracemalloc
from pathlib import Path

import pytest

from exhook.config import SqliteConfig
from storage.base import (
    PENDING_REPLAY_TTL_S,
    REPLAY_MARK_TTL_S,
    TOMBSTONE_TTL_S,
    StoreConfigError,
    StoreError,
)
from storage.model import (
    DeleteMessage,
    PendingReplay,
    RekeyMessage,
    SaveMessage,
    StoredMessage,
    Subscription,
    WriteOp,
)
from storage.sqlite import SqliteStore, prefix_upper_bound
from storage.sqlite import reads as sqlite_reads
from storage.unreadable import SkippedRows
from tests.store_reads import read_all


class FakeClock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


_counter = 0


def msgid() -> str:
    global _counter
    _counter += 1
    return f"{_counter:032X}"


def msg(topic: str, payload: bytes = b"p", *, mid: str | None = None, ts: int | None = None,
        qos: int = 1, retain: bool = False, sender: str = "pub") -> StoredMessage:
    return StoredMessage(
        msgid=mid or msgid(), sender=sender, topic=topic, qos=qos, retain=retain, payload=payload,
        timestamp=int(time.time() * 1000) if ts is None else ts,
    )


def saves(*messages: StoredMessage) -> list[SaveMessage]:
    return [SaveMessage(m) for m in messages]


async def read_topic(store: SqliteStore, topic: str, page_size: int = 100) -> list[StoredMessage]:
    highs = await store.latest_positions([topic])
    if topic not in highs:
        return []
    return await read_all(store, {topic: (None, highs[topic])}, page_size)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "sub" / "dir" / "offline.sqlite3"


@pytest.fixture
async def store(db_path: Path):
    s = SqliteStore(SqliteConfig(path=str(db_path)))
    await s.open()
    yield s
    await s.close()


async def open_store(path: Path, **kw) -> SqliteStore:
    ttl = kw.pop("message_ttl", 0)
    s = SqliteStore(SqliteConfig(path=str(path), message_ttl=ttl), **kw)
    await s.open()
    return s


# -- basics -------------------------------------------------------------------
async def test_creates_parent_dir_and_wal_and_full_sync(store: SqliteStore, db_path: Path) -> None:
    assert await asyncio.to_thread(db_path.is_file)
    other = sqlite3.connect(db_path)
    try:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in other.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"mqtt_msg", "mqtt_sub", "mqtt_replay_mark", "mqtt_replay_tombstone",
                "mqtt_replay_pending"} <= tables
        cols = [r[1] for r in other.execute("PRAGMA table_info(mqtt_msg)")]
        assert cols == ["id", "msgid", "topic", "sender", "qos", "retain", "payload", "arrived"]
    finally:
        other.close()
    assert store._writer is not None
    assert store._writer.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def hold_write_lock(path: Path) -> sqlite3.Connection:
    """Another process's connection in the middle of a write, on a file not yet in WAL mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("CREATE TABLE IF NOT EXISTS unrelated(a)")
    other.execute("BEGIN IMMEDIATE")
    return other


async def test_open_waits_while_another_connection_holds_the_write_lock(db_path: Path) -> None:
    # SQLite refuses the WAL switch at once (no busy handler) while another connection
    # writes: two workers opening one new file hit this
    other = hold_write_lock(db_path)
    release = threading.Timer(0.3, lambda: (other.execute("COMMIT"), other.close()))
    release.start()
    try:
        s = await open_store(db_path)
    finally:
        release.join()
    try:
        assert s._writer is not None
        assert s._writer.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        await s.close()


async def test_open_gives_up_after_the_busy_timeout(db_path: Path) -> None:
    other = hold_write_lock(db_path)
    try:
        with pytest.raises(StoreConfigError, match="database is locked"):
            await open_store(db_path, busy_timeout_ms=200)
    finally:
        other.close()


async def test_order_and_fields(store: SqliteStore) -> None:
    ms = [msg("t/a", f"m{i}".encode(), qos=1 + i % 2, retain=i == 3, sender=f"c{i}") for i in range(250)]
    await store.write(saves(*ms[:100]))
    await store.write(saves(*ms[100:]))
    got = await read_topic(store, "t/a", page_size=7)
    assert [m.msgid for m in got] == [m.msgid for m in ms]
    assert [m.payload for m in got] == [m.payload for m in ms]
    assert all(g.sender == m.sender and g.qos == m.qos and g.retain == m.retain and g.topic == "t/a"
               and g.timestamp == m.timestamp for g, m in zip(got, ms, strict=True))
    positions = [m.position for m in got]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)
    assert isinstance(positions[0], float)


async def test_binary_payloads(store: SqliteStore) -> None:
    payloads = [b"", b"\x00", b"\x00\x00\x00", b"\xff\xfe\x80\xc0", "é€😀".encode(), b"a\x00b",
                os.urandom(1024 * 1024)]
    ms = [msg("bin/t", p) for p in payloads]
    await store.write(saves(*ms))
    got = await read_topic(store, "bin/t", page_size=3)
    assert [g.payload for g in got] == payloads
    assert all(type(g.payload) is bytes for g in got)


async def test_save_is_idempotent_under_retry(store: SqliteStore) -> None:
    batch = saves(msg("r/t"), msg("r/t"))
    await store.write(batch)
    await store.write(batch)  # the writer retries a batch whose outcome it did not learn
    assert len(await read_topic(store, "r/t")) == 2


async def test_batch_is_one_transaction(store: SqliteStore) -> None:
    good = msg("tx/t")
    bad = StoredMessage("BAD", "s", "tx/t", 1, False, object(), 1)  # type: ignore[arg-type]
    with pytest.raises(StoreError):
        await store.write([SaveMessage(good), SaveMessage(bad)])
    assert await read_topic(store, "tx/t") == []
    await store.write([SaveMessage(good)])  # the connection is usable afterwards
    assert [m.msgid for m in await read_topic(store, "tx/t")] == [good.msgid]


async def test_empty_write_and_unknown_delete(store: SqliteStore) -> None:
    await store.write([])
    await store.write([DeleteMessage("0" * 32, "x")])


# -- discovery ----------------------------------------------------------------
def test_prefix_upper_bound() -> None:
    assert prefix_upper_bound("") is None
    assert prefix_upper_bound("a/") == "a0"
    assert prefix_upper_bound("ab") == "ac"
    assert prefix_upper_bound("a\U0010ffff") == "b"
    assert prefix_upper_bound("\U0010ffff") is None
    assert prefix_upper_bound("x\ud7ff") == "x\ue000"
    assert prefix_upper_bound("x\x7f") == "x\x80"


async def test_stored_topics(store: SqliteStore) -> None:
    topics = ["a/b", "a/b/c", "a/bz", "a/b0", "a/c", "a", "ab", "b/x", "a/\U0010ffff", "a/\U0010ffff/z",
              "é/1", "é/2", "\U0010ffff/q"]
    await store.write(saves(*[msg(t) for t in topics for _ in range(3)]))
    assert await store.stored_topics("") == sorted(topics)
    assert await store.stored_topics("a/") == sorted(t for t in topics if t.startswith("a/"))
    assert await store.stored_topics("a/b") == ["a/b", "a/b/c", "a/b0", "a/bz"]
    assert await store.stored_topics("a/b/") == ["a/b/c"]
    assert await store.stored_topics("a/\U0010ffff") == ["a/\U0010ffff", "a/\U0010ffff/z"]
    assert await store.stored_topics("é/") == ["é/1", "é/2"]
    assert await store.stored_topics("\U0010ffff") == ["\U0010ffff/q"]
    assert await store.stored_topics("zzz") == []


async def test_latest_positions(store: SqliteStore) -> None:
    a1, b1, a2 = msg("lp/a"), msg("lp/b"), msg("lp/a")
    await store.write(saves(a1, b1, a2))
    got = await store.latest_positions(["lp/a", "lp/b", "lp/none"])
    assert set(got) == {"lp/a", "lp/b"}
    assert got["lp/a"] > got["lp/b"]
    assert await store.latest_positions([]) == {}


async def test_read_merged_across_topics(store: SqliteStore) -> None:
    ms = [msg(f"m/{i % 5}", f"{i}".encode()) for i in range(300)]
    await store.write(saves(*ms))
    highs = await store.latest_positions([f"m/{i}" for i in range(5)])
    everything = await read_all(store, {t: (None, h) for t, h in highs.items()}, page_size=11)
    assert [m.msgid for m in everything] == [m.msgid for m in ms]
    pos = {m.msgid: m.position for m in everything}
    # partial ranges: (low, high] per topic
    ranges = {"m/0": (pos[ms[100].msgid], pos[ms[200].msgid]), "m/3": (None, pos[ms[53].msgid]),
              "m/4": (pos[ms[299].msgid], pos[ms[299].msgid])}
    want = [m for i, m in enumerate(ms)
            if (i % 5 == 0 and 100 < i <= 200) or (i % 5 == 3 and i <= 53)]
    got = await read_all(store, ranges, page_size=4)
    assert [m.msgid for m in got] == [m.msgid for m in want]
    assert await read_all(store, {}, 10) == []
    assert await read_all(store, {"m/nothing": (None, 1e9)}, 10) == []
    unbounded = await read_all(store, {"m/1": (-5.0, float("inf")), "m/2": (pos[ms[296].msgid] - 0.5, 1e30)})
    assert [m.msgid for m in unbounded] == [m.msgid for i, m in enumerate(ms) if i % 5 == 1 or i == 297]


async def test_read_skips_rows_deleted_meanwhile(store: SqliteStore) -> None:
    ms = [msg(f"d/{i % 2}") for i in range(40)]
    await store.write(saves(*ms))
    highs = await store.latest_positions(["d/0", "d/1"])
    pages = store.read_messages({t: (None, h) for t, h in highs.items()}, 10)
    first = await anext(pages)
    await store.write([DeleteMessage(m.msgid, m.topic) for m in ms[10:20]])
    rest = [m async for page in pages for m in page]
    assert [m.msgid for m in first + rest] == [m.msgid for m in ms[:10] + ms[20:]]


async def test_read_memory_is_flat(store: SqliteStore) -> None:
    n = 100_000
    payload = b"x" * 200
    for start in range(0, n, 5000):
        await store.write(saves(*[msg("big/t", payload) for _ in range(start, start + 5000)]))
    high = (await store.latest_positions(["big/t"]))["big/t"]
    tracemalloc.start()
    try:
        count = 0
        async for page in store.read_messages({"big/t": (None, high)}, 100):
            count += len(page)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == n
    assert peak < 5 * 1024 * 1024, peak  # all of it at once would be > 40 MB


# -- acks, re-keys, tombstones -------------------------------------------------
async def test_ack_deletes(store: SqliteStore) -> None:
    a, b = msg("ack/t"), msg("ack/t")
    await store.write(saves(a, b))
    await store.write([DeleteMessage(a.msgid, a.topic)])
    assert [m.msgid for m in await read_topic(store, "ack/t")] == [b.msgid]
    # save + ack in one batch
    c = msg("ack/t")
    await store.write([SaveMessage(c), DeleteMessage(c.msgid, c.topic), DeleteMessage(b.msgid, b.topic)])
    assert await read_topic(store, "ack/t") == []


async def test_rekey_keeps_position(store: SqliteStore) -> None:
    a, b = msg("rk/t", b"A"), msg("rk/t", b"B")
    await store.write(saves(a, b))
    before = await read_topic(store, "rk/t")
    await store.write([RekeyMessage(a.msgid, "NEW" + a.msgid[3:], a.topic)])
    after = await read_topic(store, "rk/t")
    assert [m.msgid for m in after] == ["NEW" + a.msgid[3:], b.msgid]
    assert [m.position for m in after] == [m.position for m in before]
    assert after[0].payload == b"A"
    # retried re-key: a no-op
    await store.write([RekeyMessage(a.msgid, "NEW" + a.msgid[3:], a.topic)])
    assert await read_topic(store, "rk/t") == after
    # the subscriber's ack carries the new id
    await store.write([DeleteMessage("NEW" + a.msgid[3:], a.topic, replay_ack=True)])
    assert [m.msgid for m in await read_topic(store, "rk/t")] == [b.msgid]


@pytest.mark.parametrize("same_batch", [False, True])
async def test_ack_before_rekey_leaves_tombstone(store: SqliteStore, same_batch: bool) -> None:
    a = msg("tb/t")
    await store.write(saves(a))
    new = msgid()
    ack = DeleteMessage(new, a.topic, replay_ack=True)
    rekey = RekeyMessage(a.msgid, new, a.topic)
    if same_batch:
        await store.write([ack, rekey])
    else:
        await store.write([ack])
        assert len(await read_topic(store, "tb/t")) == 1
        await store.write([rekey])
    assert await read_topic(store, "tb/t") == []


@pytest.mark.parametrize("same_batch", [False, True])
async def test_rekey_before_ack(store: SqliteStore, same_batch: bool) -> None:
    a = msg("tb2/t")
    await store.write(saves(a))
    new = msgid()
    ops: list[WriteOp] = [RekeyMessage(a.msgid, new, a.topic), DeleteMessage(new, a.topic, replay_ack=True)]
    if same_batch:
        await store.write(ops)
    else:
        await store.write(ops[:1])
        await store.write(ops[1:])
    assert await read_topic(store, "tb2/t") == []


async def test_plain_ack_leaves_no_tombstone_and_tombstone_expires(db_path: Path) -> None:
    clock = FakeClock()
    store = await open_store(db_path, clock=clock)
    try:
        a, b = msg("te/t"), msg("te/t")
        await store.write(saves(a, b))
        n1, n2 = msgid(), msgid()
        await store.write([DeleteMessage(n1, a.topic)])  # not a replay ack: no tombstone
        await store.write([DeleteMessage(n2, b.topic, replay_ack=True)])
        clock.now += TOMBSTONE_TTL_S + 1  # the tombstone of n2 has expired
        await store.write([RekeyMessage(a.msgid, n1, a.topic), RekeyMessage(b.msgid, n2, b.topic)])
        assert [m.msgid for m in await read_topic(store, "te/t")] == [n1, n2]
    finally:
        await store.close()


async def test_rekey_onto_existing_id_does_not_poison_batch(store: SqliteStore) -> None:
    a, b = msg("px/t"), msg("px/t")
    await store.write(saves(a, b))
    await store.write([RekeyMessage(a.msgid, b.msgid, a.topic)])
    assert [m.msgid for m in await read_topic(store, "px/t")] == [b.msgid]


# -- replay bookkeeping --------------------------------------------------------
async def test_claim_replay(store: SqliteStore) -> None:
    assert await store.claim_replay("c1", {"t/1": 5.0, "t/2": 7.0}) == {"t/1": None, "t/2": None}
    assert await store.claim_replay("c1", {"t/1": 9.0}) == {"t/1": 5.0}
    assert await store.claim_replay("c1", {"t/1": 6.0}) == {"t/1": 9.0}  # a mark never goes down
    assert await store.claim_replay("c1", {"t/1": 10.0, "t/2": 7.0}) == {"t/1": 9.0, "t/2": 7.0}
    assert await store.claim_replay("c2", {"t/1": 10.0}) == {"t/1": None}
    await store.reset_replay_marks("c1")
    assert await store.claim_replay("c1", {"t/1": 10.0}) == {"t/1": None}
    assert await store.claim_replay("c2", {"t/1": 10.0}) == {"t/1": 10.0}
    assert await store.claim_replay("c1", {}) == {}
    await store.save_subscription("fresh", "t/#", 1)
    assert await store.claim_replay("fresh|n|h|1", {"t/1": 10.0}) == {"t/1": None}
    assert await store.fresh_session_subscriptions("fresh", "fresh|n|h|1") == [Subscription("t/#", 1)]
    assert await store.claim_replay("fresh|n|h|1", {"t/1": 10.0}) == {"t/1": None}  # forgotten
    assert await store.fresh_session_subscriptions("nobody", "nobody|n|h|1") == []


async def test_concurrent_claims_one_winner(store: SqliteStore, db_path: Path) -> None:
    other = await open_store(db_path)  # a second service instance on the same file
    try:
        results = await asyncio.gather(
            *[(store if i % 2 else other).claim_replay("conn", {"x": 42.0}) for i in range(40)]
        )
    finally:
        await other.close()
    assert sum(1 for r in results if r["x"] is None) == 1
    assert all(r["x"] in (None, 42.0) for r in results)


async def test_replay_marks_expire(db_path: Path) -> None:
    clock = FakeClock()
    store = await open_store(db_path, clock=clock)
    try:
        await store.claim_replay("c", {"t": 3.0})
        clock.now += REPLAY_MARK_TTL_S - 10
        assert await store.claim_replay("c", {"t": 4.0}) == {"t": 3.0}  # refreshed
        clock.now += REPLAY_MARK_TTL_S - 10
        assert await store.claim_replay("c", {"t": 4.0}) == {"t": 4.0}
        clock.now += REPLAY_MARK_TTL_S + 1
        assert await store.claim_replay("c", {"t": 2.0}) == {"t": None}
        assert await store.claim_replay("c", {"t": 2.0}) == {"t": 2.0}
    finally:
        await store.close()


async def test_pending_replays(db_path: Path) -> None:
    clock = FakeClock()
    store = await open_store(db_path, clock=clock)
    try:
        await store.register_pending_replays([
            PendingReplay("p/t", "d1", "ID1"), PendingReplay("p/t", "d1", "ID2"),
            PendingReplay("p/t", "d2", "ID3"), PendingReplay("p/u", "d1", "ID4"),
        ])
        await store.register_pending_replays([])
        assert await store.take_pending_replay("p/t", "d1") == "ID1"
        assert await store.take_pending_replay("p/t", "d1") == "ID2"
        assert await store.take_pending_replay("p/t", "d1") is None
        assert await store.take_pending_replay("p/t", "zz") is None
        # concurrent pops: each entry is taken once
        await store.register_pending_replays([PendingReplay("p/c", "d", f"C{i}") for i in range(10)])
        got = await asyncio.gather(*[store.take_pending_replay("p/c", "d") for _ in range(15)])
        assert sorted(g for g in got if g) == sorted(f"C{i}" for i in range(10))
        assert got.count(None) == 5
        clock.now += PENDING_REPLAY_TTL_S + 1
        assert await store.take_pending_replay("p/t", "d2") is None
        assert await store.take_pending_replay("p/u", "d1") is None
    finally:
        await store.close()


# -- TTL -----------------------------------------------------------------------
async def test_ttl_and_purge(db_path: Path) -> None:
    clock = FakeClock()
    store = await open_store(db_path, clock=clock, message_ttl=60)
    try:
        now_ms = int(clock.now * 1000)
        old = [msg(f"ttl/{i % 2}", ts=now_ms - 120_000 + i) for i in range(30)]
        fresh = [msg(f"ttl/{i % 2}", ts=now_ms - 1000) for i in range(4)]
        no_ts = msg("ttl/0", ts=0)  # no broker timestamp: counts from when it was written
        await store.write(saves(*old, *fresh, no_ts))
        highs = await store.latest_positions(["ttl/0", "ttl/1"])
        got = await read_all(store, {t: (None, h) for t, h in highs.items()}, 3)
        assert [m.msgid for m in got] == [m.msgid for m in [*fresh, no_ts]]
        assert (await read_all(store, {"ttl/1": (None, highs["ttl/1"])}, 2)) == [
            m for m in got if m.topic == "ttl/1"]
        # only expired messages left on a topic: it has no latest position
        await store.write(saves(only_old := msg("ttl/old", ts=now_ms - 120_000)))
        assert await store.latest_positions(["ttl/old"]) == {}
        assert await read_all(store, {"ttl/old": (None, 1e12)}, 5) == []
        assert only_old.topic in await store.stored_topics("ttl/")  # still stored until purged
        assert await store.purge_expired(10) == 10
        assert await store.purge_expired(100) == 21
        assert await store.purge_expired(100) == 0
        assert await store.purge_expired(0) == 0
        assert await store.stored_topics("ttl/") == ["ttl/0", "ttl/1"]
        clock.now += 61
        assert await store.latest_positions(["ttl/0", "ttl/1"]) == {}
        assert await store.purge_expired(1000) == 5
    finally:
        await store.close()


async def test_no_ttl_keeps_messages_and_purges_bookkeeping(db_path: Path) -> None:
    clock = FakeClock()
    store = await open_store(db_path, clock=clock)
    try:
        await store.write(saves(msg("keep/t", ts=1)))
        await store.claim_replay("c", {"keep/t": 1.0})
        await store.register_pending_replays([PendingReplay("keep/t", "d", "X")])
        await store.write([DeleteMessage("Y", "keep/t", replay_ack=True)])
        clock.now += REPLAY_MARK_TTL_S + 1
        assert await store.purge_expired(100) == 0
        assert len(await read_topic(store, "keep/t")) == 1
        assert store._writer is not None
        for table in ("mqtt_replay_mark", "mqtt_replay_tombstone", "mqtt_replay_pending"):
            assert store._writer.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 0
    finally:
        await store.close()


# -- subscriptions -------------------------------------------------------------
async def test_subscriptions(store: SqliteStore) -> None:
    assert await store.subscriptions("c1") == []
    await store.save_subscription("c1", "a/#", 1)
    await store.save_subscription("c1", "b", 2)
    await store.save_subscription("c1", "a/#", 2)  # upsert
    await store.save_subscription("c2", "x", 0)
    assert await store.subscriptions("c1") == [Subscription("a/#", 2), Subscription("b", 2)]
    await store.delete_subscription("c1", "a/#")
    await store.delete_subscription("c1", "never")
    assert await store.subscriptions("c1") == [Subscription("b", 2)]
    assert await store.subscriptions("c2") == [Subscription("x", 0)]


# -- lifecycle -----------------------------------------------------------------
async def test_reopen_persists_and_never_reuses_ids(db_path: Path) -> None:
    store = await open_store(db_path)
    a, b = msg("p/t", b"\x00A"), msg("p/t", b"B")
    await store.write(saves(a, b))
    await store.save_subscription("c", "p/t", 1)
    await store.claim_replay("conn", {"p/t": 2.0})
    high = (await store.latest_positions(["p/t"]))["p/t"]
    await store.write([DeleteMessage(b.msgid, b.topic)])  # the newest row goes
    await store.close()
    with pytest.raises(StoreError):
        await store.latest_positions(["p/t"])
    with pytest.raises(StoreError):
        await store.write(saves(msg("p/t")))

    store = await open_store(db_path)
    try:
        got = await read_topic(store, "p/t")
        assert [(m.msgid, m.payload) for m in got] == [(a.msgid, b"\x00A")]
        assert await store.subscriptions("c") == [Subscription("p/t", 1)]
        assert await store.claim_replay("conn", {"p/t": 3.0}) == {"p/t": 2.0}
        c = msg("p/t")
        await store.write(saves(c))
        assert (await store.latest_positions(["p/t"]))["p/t"] > high  # AUTOINCREMENT
    finally:
        await store.close()


async def test_close_stops_threads(db_path: Path) -> None:
    store = await open_store(db_path)
    await store.write(saves(msg("th/t")))
    await read_topic(store, "th/t")
    assert any(t.name.startswith("sqlite-") for t in threading.enumerate())
    await store.close()
    await store.close()  # idempotent
    assert not any(t.name.startswith("sqlite-") for t in threading.enumerate())


async def test_open_on_unusable_path(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    store = SqliteStore(SqliteConfig(path=str(blocker / "db.sqlite3")))
    with pytest.raises(StoreConfigError):
        await store.open()
    not_a_db = tmp_path / "garbage.sqlite3"
    not_a_db.write_bytes(b"this is not a database" * 100)
    store = SqliteStore(SqliteConfig(path=str(not_a_db)))
    with pytest.raises(StoreConfigError):
        await store.open()
    assert not any(t.name.startswith("sqlite-") for t in threading.enumerate())


async def test_not_open_raises_store_error(db_path: Path) -> None:
    store = SqliteStore(SqliteConfig(path=str(db_path)))
    with pytest.raises(StoreError):
        await store.subscriptions("c")


# -- concurrency ---------------------------------------------------------------
async def test_event_loop_not_blocked_by_big_write(store: SqliteStore) -> None:
    ms = [msg("loop/t", os.urandom(300)) for _ in range(20_000)]
    ops = saves(*ms)
    ticks = 0
    task = asyncio.ensure_future(store.write(ops))
    # the loop ticks every millisecond: spinning with sleep(0) would hold the interpreter
    # lock the store's thread needs, and the write would take a minute instead of a second
    while not task.done():
        ticks += 1
        await asyncio.sleep(0.001)
    await task
    # a write on the loop thread would complete before the first tick
    assert ticks > 20
    ticks = 0
    high = (await store.latest_positions(["loop/t"]))["loop/t"]
    reader = asyncio.ensure_future(read_all(store, {"loop/t": (None, high)}, 5000))
    while not reader.done():
        ticks += 1
        await asyncio.sleep(0.001)
    assert len(await reader) == 20_000
    assert ticks > 4


async def test_concurrent_writes_and_reads(store: SqliteStore) -> None:
    topics = [f"cc/{i}" for i in range(4)]
    written: list[StoredMessage] = []

    async def writer(k: int) -> None:
        for _ in range(30):
            batch = [msg(topics[(k + j) % 4], f"{k}".encode()) for j in range(20)]
            written.extend(batch)
            await store.write(saves(*batch))

    async def reader() -> int:
        seen = 0
        for _ in range(30):
            highs = await store.latest_positions(topics)
            got = await read_all(store, {t: (None, h) for t, h in highs.items()}, 50)
            positions = [m.position for m in got]
            assert positions == sorted(positions)
            assert len(got) >= seen  # nothing is deleted here: reads only grow
            seen = len(got)
            await asyncio.sleep(0)
        return seen

    results = await asyncio.gather(*[writer(k) for k in range(4)], *[reader() for _ in range(3)],
                                   *[store.claim_replay(f"c{i}", {"cc/0": 1.0}) for i in range(10)])
    assert all(isinstance(r, int) for r in results[4:7])
    highs = await store.latest_positions(topics)
    final = await read_all(store, {t: (None, h) for t, h in highs.items()}, 100)
    assert len(final) == len(written) == 4 * 30 * 20
    assert {m.msgid for m in final} == {m.msgid for m in written}


async def test_read_skips_rows_another_tool_wrote(store: SqliteStore, db_path: Path, caplog: pytest.LogCaptureFixture,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # SQLite does not enforce column types: a row put in by another tool (the sqlite3
    # CLI, a migration) may hold TEXT where we write BLOBs, or values no message has
    ms = [msg("f/t", b"p%d" % i) for i in range(4)]
    await store.write(saves(*ms[:2]))
    other = sqlite3.connect(db_path)
    readable = [  # (msgid, qos, payload) -> (msgid, qos, payload) read
        (("F1", 1, "text payload \u20ac"), ("F1", 1, "text payload \u20ac".encode())),
        (("F2", 2, ""), ("F2", 2, b"")),
        ((b"F3", 1, b"msgid as a blob"), ("F3", 1, b"msgid as a blob")),
        # read as they are: the replay leaves them out and counts them (bad_qos)
        (("F4", 3, b"qos 3"), ("F4", 3, b"qos 3")),
        (("F5", -1, b"qos -1"), ("F5", -1, b"qos -1")),
    ]
    unreadable = [("U1", "one", b"qos as text"), ("U2", 1.5, b"qos 1.5"), ("U3", 1, 42), ("U4", 1, 1.5),
                  (b"\xff", 1, b"msgid not UTF-8"), ("", 1, b"empty msgid")]
    try:
        for mid, qos, payload in [row for row, _ in readable] + unreadable:
            other.execute("INSERT INTO mqtt_msg(msgid, sender, topic, qos, retain, payload, arrived) "
                          "VALUES (?, 'tool', 'f/t', ?, 0, ?, 1)", (mid, qos, payload))
        # text that is not UTF-8 (sqlite3 would fail the whole fetch decoding it)
        other.execute("INSERT INTO mqtt_msg(msgid, sender, topic, qos, retain, payload, arrived) "
                      "VALUES ('F6', CAST(x'ff' AS TEXT), 'f/t', 1, 0, CAST(x'c3ff' AS TEXT), 1)")
        other.commit()
    finally:
        other.close()
    await store.write(saves(*ms[2:]))
    skipped = SkippedRows("sqlite")
    monkeypatch.setattr(sqlite_reads, "SKIPPED", skipped)
    caplog.set_level(logging.WARNING, logger="storage.sqlite.reads")
    want = [*((m.msgid, m.qos, m.payload) for m in ms[:2]), *(read for _, read in readable), ("F6", 1, b"\xc3\xff"),
            *((m.msgid, m.qos, m.payload) for m in ms[2:])]
    for page_size in (1, 3, 100):  # one topic: one query per page
        got = await read_topic(store, "f/t", page_size)
        assert [(m.msgid, m.qos, m.payload) for m in got] == want
        assert got[-3].sender == "\ufffd"
    # merged with another topic: rows loaded by id
    await store.write(saves(msg("f/u")))
    highs = await store.latest_positions(["f/t", "f/u"])
    merged = await read_all(store, {t: (None, h) for t, h in highs.items()}, 2)
    assert [(m.msgid, m.qos, m.payload) for m in merged[:-1]] == want and merged[-1].topic == "f/u"
    assert skipped.count == 4 * len(unreadable)  # read 4 times
    lines = [r.getMessage() for r in caplog.records if "skipping unreadable stored message" in r.getMessage()]
    assert len(lines) == 1, lines  # one line a minute, however often the rows are met
    assert "qos 'one' is not an integer" in lines[0]
