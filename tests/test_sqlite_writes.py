"""What SqliteStore.write does with values it cannot take and with failures of the file:
each op is stored byte-exact or refused by index (the rest written on retry), a locked,
full or failing file is a transient error, a schema changed under the service is a
setup error. Real SQLite files only (one per test, under tmp_path)."""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage.base import StoreConfigError, StoreError, WriteRejected
from storage.model import (
    DeleteMessage,
    DropPendingReplay,
    PendingReplay,
    RekeyMessage,
    SaveMessage,
    StoredMessage,
    WriteOp,
)
from storage.sqlite import SqliteStore
from storage.sqlite import write as write_path
from storage.sqlite.errors import classify
from tests.test_sqlite_store import db_path, msg, msgid, open_store, read_topic, saves, store

__all__ = ["db_path", "store"]  # fixtures shared with test_sqlite_store


async def write_setting_aside(store: SqliteStore, ops: list[WriteOp]) -> list[tuple[WriteOp, WriteRejected]]:
    """Write ``ops`` as the ordered writer does: an op refused by index is set aside
    and the rest is written again. Returns what was set aside."""
    rest, aside = list(ops), []
    while True:
        try:
            await store.write(rest)
            return aside
        except WriteRejected as exc:
            assert exc.index is not None, "the store names the op it refuses"
            aside.append((rest.pop(exc.index), exc))


def other_connection(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None, check_same_thread=False)


async def stored_ids(store: SqliteStore, topic: str) -> list[str]:
    return [m.msgid for m in await read_topic(store, topic)]


# -- values SQLite cannot take: refused by index before anything is written ---------
POISON = {
    "timestamp 2**64-1": (lambda t: SaveMessage(msg(t, ts=2**64 - 1)), "out_of_range", "timestamp"),
    "qos 255": (lambda t: SaveMessage(msg(t, qos=255)), "out_of_range", "qos"),
    "negative qos": (lambda t: SaveMessage(msg(t, qos=-1)), "out_of_range", "qos"),
    "surrogate in topic": (lambda t: SaveMessage(msg(t + "/\ud800")), "invalid_value", "topic"),
    "surrogate in sender": (lambda t: SaveMessage(msg(t, sender="c\udcff")), "invalid_value", "sender"),
    "surrogate in msgid": (lambda t: SaveMessage(msg(t, mid="\ud83d" + "0" * 31)), "invalid_value", "msgid"),
    "payload not bytes": (lambda t: SaveMessage(msg(t, payload="text"))  # type: ignore[arg-type]
                          , "invalid_value", "payload"),
    "surrogate in ack": (lambda t: DeleteMessage("\udc80", t), "invalid_value", "msgid"),
    "surrogate in re-key": (lambda t: RekeyMessage(msgid(), "\udc80", t), "invalid_value", "new msgid"),
    "surrogate in pending drop": (lambda t: DropPendingReplay(t, "\udc80", "X"), "invalid_value", "digest"),
}


@pytest.mark.parametrize("poison", list(POISON))
async def test_poison_op_is_refused_by_index_and_the_rest_is_written(store: SqliteStore, poison: str) -> None:
    make, reason, field = POISON[poison]
    topic = "poison/" + poison.replace(" ", "_")
    before, after = msg(topic, b"before"), msg(topic, b"after")
    ops: list[WriteOp] = [SaveMessage(before), make(topic), SaveMessage(after)]
    with pytest.raises(WriteRejected) as caught:
        await store.write(ops)
    assert (caught.value.reason, caught.value.index) == (reason, 1)
    assert field in caught.value.detail and "\n" not in str(caught.value)
    assert not caught.value.retryable
    assert await stored_ids(store, topic) == []  # nothing of the batch was written
    await store.write([ops[0], ops[2]])  # the writer sets the op aside and retries
    assert await stored_ids(store, topic) == [before.msgid, after.msgid]


async def test_issue_10_timestamp_no_longer_stalls_the_batch(store: SqliteStore) -> None:
    # issue 10: OverflowError on this timestamp made the writer retry the batch forever
    good = [msg("i10/t", f"{i}".encode()) for i in range(5)]
    bad = msg("i10/t", b"bad", ts=2**64 - 1)
    ops: list[WriteOp] = [*saves(*good[:2]), SaveMessage(bad), *saves(*good[2:])]
    aside = await write_setting_aside(store, ops)
    assert [(op, exc.reason) for op, exc in aside] == [(SaveMessage(bad), "out_of_range")]
    got = await read_topic(store, "i10/t")
    assert [(m.msgid, m.payload) for m in got] == [(m.msgid, m.payload) for m in good]


async def test_largest_integers_fit(store: SqliteStore) -> None:
    big = msg("ts/max", ts=2**63 - 1)
    await store.write(saves(big))
    assert [m.timestamp for m in await read_topic(store, "ts/max")] == [2**63 - 1]


async def test_value_over_the_length_limit_is_refused_before_writing(db_path: Path) -> None:
    store = await open_store(db_path, max_value_bytes=1 << 20)
    try:
        # the limit bounds a whole row (SQLite's record), not only one value: with its
        # 40 bytes of msgid, topic and sender, this payload leaves 5 bytes for the
        # record's header and integers, too few (the check finds it, not SQLite)
        fits, too_big = msg("len/t", b"x" * ((1 << 20) - 200)), msg("len/t", b"x" * ((1 << 20) - 45))
        long_topic = msg("t" * ((1 << 20) + 1))
        with pytest.raises(WriteRejected) as caught:
            await store.write(saves(fits, too_big))
        assert (caught.value.reason, caught.value.index) == ("too_large", 1)
        assert "SQLITE_TOOBIG" not in caught.value.detail
        with pytest.raises(WriteRejected) as caught:
            await store.write(saves(fits, long_topic))
        assert (caught.value.reason, caught.value.index) == ("too_long", 1)
        assert "topic" in caught.value.detail
        await store.write(saves(fits))
        assert [len(m.payload) for m in await read_topic(store, "len/t")] == [(1 << 20) - 200]
    finally:
        await store.close()


# -- values that fit are stored byte-exact ------------------------------------------
ODD_TEXT = ["a\x00b", "emoji/😀/\U0010ffff", "x'; DROP TABLE mqtt_msg; --", "quote\"back\\slash", "tab\tnew\nline"]


async def test_hostile_but_valid_values_are_stored_byte_exact(store: SqliteStore) -> None:
    ms = [
        msg("long/msgid", mid="M" * 100),
        msg("t" * 300),
        msg("é" * 32767 + "x"),  # 65,535 bytes of UTF-8
        msg("big/payload", os.urandom(16 * 1024 * 1024)),
        *[msg(topic, topic.encode(), sender=topic) for topic in ODD_TEXT],
    ]
    assert len(ms[2].topic.encode()) == 65_535
    await store.write(saves(*ms))
    for m in ms:
        got = await read_topic(store, m.topic)
        assert len(got) == 1 and got[0].msgid == m.msgid
        assert (got[0].topic, got[0].sender, got[0].payload) == (m.topic, m.sender, m.payload)
    assert "a\x00b" in await store.stored_topics("a")
    assert "a" not in await store.stored_topics("a")  # a NUL does not cut the topic short


async def test_hostile_clientids_and_topics_in_subscriptions(store: SqliteStore) -> None:
    for text in ODD_TEXT:
        await store.save_subscription(text, text + "/#", 1)
    for text in ODD_TEXT:
        assert [(s.topic, s.qos) for s in await store.subscriptions(text)] == [(text + "/#", 1)]
    await store.save_subscription("c" * 100, "t", 2)  # no varchar(64) here
    assert [s.topic for s in await store.subscriptions("c" * 100)] == ["t"]


@pytest.mark.parametrize(("clientid", "topic", "qos", "reason"), [
    ("c\ud800", "t", 1, "invalid_value"),
    ("c", "t/\udfff", 1, "invalid_value"),
    ("c", "t", 3, "out_of_range"),
])
async def test_subscription_that_cannot_be_stored_is_rejected(
    store: SqliteStore, clientid: str, topic: str, qos: int, reason: str
) -> None:
    with pytest.raises(WriteRejected) as caught:
        await store.save_subscription(clientid, topic, qos)
    assert caught.value.reason == reason and caught.value.index is None
    assert await store.subscriptions("c") == []


# -- duplicate ids ---------------------------------------------------------------------
async def test_same_message_twice_is_stored_once(store: SqliteStore) -> None:
    m = msg("dup/same", b"one")
    await store.write(saves(m, m))
    await store.write(saves(m))  # the broker or the writer sends it again
    assert [(g.msgid, g.payload) for g in await read_topic(store, "dup/same")] == [(m.msgid, b"one")]


async def test_message_without_timestamp_saved_again_is_the_same_message(store: SqliteStore) -> None:
    m = msg("dup/nots", ts=0)  # stored with the time of writing, which differs on a retry
    await store.write(saves(m))
    await store.write(saves(m))
    assert len(await read_topic(store, "dup/nots")) == 1


@pytest.mark.parametrize("same_batch", [True, False])
async def test_another_message_under_a_stored_id_is_refused(store: SqliteStore, same_batch: bool) -> None:
    first = msg("dup/other", b"first")
    other = StoredMessage(first.msgid, first.sender, first.topic, first.qos, first.retain, b"other", first.timestamp)
    tail = msg("dup/other", b"tail")
    if not same_batch:
        await store.write(saves(first))
    ops = [*(saves(first) if same_batch else []), SaveMessage(other), SaveMessage(tail)]
    aside = await write_setting_aside(store, ops)
    assert [(op, exc.reason) for op, exc in aside] == [(SaveMessage(other), "constraint")]
    got = await read_topic(store, "dup/other")
    assert [(g.msgid, g.payload) for g in got] == [(first.msgid, b"first"), (tail.msgid, b"tail")]


# -- refusals by SQLite itself, after the checks ---------------------------------------
async def test_refusal_by_a_trigger_names_the_op_and_writes_nothing(store: SqliteStore, db_path: Path) -> None:
    # an operator's trigger: SQLite refuses the op (SQLITE_CONSTRAINT_TRIGGER) inside a
    # run of four saves, so the store tries the run op by op to name it
    admin = other_connection(db_path)
    admin.execute(
        "CREATE TRIGGER no_forbidden BEFORE INSERT ON mqtt_msg WHEN NEW.topic = 'trig/forbidden' "
        "BEGIN SELECT RAISE(ABORT, 'forbidden\ntopic'); END"
    )
    admin.close()
    ms = [msg("trig/ok", b"0"), msg("trig/ok", b"1"), msg("trig/forbidden"), msg("trig/ok", b"3")]
    with pytest.raises(WriteRejected) as caught:
        await store.write(saves(*ms))
    assert (caught.value.reason, caught.value.index) == ("constraint", 2)
    assert "forbidden topic" in caught.value.detail and "\n" not in str(caught.value)
    assert await stored_ids(store, "trig/ok") == []
    await store.write(saves(*ms[:2], ms[3]))
    assert await stored_ids(store, "trig/ok") == [ms[0].msgid, ms[1].msgid, ms[3].msgid]


async def test_sqlite_length_limit_refusal_names_the_op(store: SqliteStore) -> None:
    # the checks read the limit at open; SQLite's own refusal (SQLITE_TOOBIG) is the
    # second line of defence when the connection's limit is lower
    assert store._writer is not None
    store._writer.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 1000)
    ms = [msg("toobig/t", b"a"), msg("toobig/t", b"b"), msg("toobig/t", b"x" * 2000)]
    with pytest.raises(WriteRejected) as caught:
        await store.write(saves(*ms))
    assert (caught.value.reason, caught.value.index) == ("too_large", 2)
    assert "SQLITE_TOOBIG" in caught.value.detail
    assert await stored_ids(store, "toobig/t") == []


async def test_overflow_past_the_checks_names_the_op(store: SqliteStore) -> None:
    # issue 10's OverflowError, had a value passed the checks: the write path itself
    # turns it into a refusal of that op, and the transaction is rolled back
    ops = saves(msg("ovf/t"), msg("ovf/t"), msg("ovf/t", ts=2**64 - 1), msg("ovf/t"))
    with pytest.raises(WriteRejected) as caught:
        await store._db.write_tx(lambda conn: write_path.apply(conn, ops, 1))
    assert (caught.value.reason, caught.value.index) == ("out_of_range", 2)
    assert await stored_ids(store, "ovf/t") == []


# -- the pending-replay registry: DropPendingReplay ------------------------------------
async def test_drop_pending_replay_removes_that_one_entry(store: SqliteStore) -> None:
    await store.register_pending_replays([
        PendingReplay("dp/t", "d", "ID1"), PendingReplay("dp/t", "d", "ID2"),
        PendingReplay("dp/t", "d", "ID1"),  # the same message replayed to a second subscriber
        PendingReplay("dp/u", "d", "ID1"),
    ])
    kept = msg("dp/t")
    await store.write([DropPendingReplay("dp/t", "d", "ID1"), SaveMessage(kept),
                       DropPendingReplay("dp/t", "d", "ID9")])  # absent: nothing to do
    assert await stored_ids(store, "dp/t") == [kept.msgid]
    assert [await store.take_pending_replay("dp/t", "d") for _ in range(3)] == ["ID2", "ID1", None]
    assert await store.take_pending_replay("dp/u", "d") == "ID1"
    await store.write([DropPendingReplay("dp/t", "d", "ID1")])  # nothing left: still no error


async def test_drop_pending_replay_is_applied_in_order(store: SqliteStore) -> None:
    await store.register_pending_replays([PendingReplay("dpo/t", "d", "A")])
    await store.write([DropPendingReplay("dpo/t", "d", "A"), DropPendingReplay("dpo/t", "d", "A")])
    assert await store.take_pending_replay("dpo/t", "d") is None


# -- transient failures: the batch is kept and written when the file is back -----------
async def test_locked_file_is_a_transient_error(db_path: Path) -> None:
    store = await open_store(db_path, busy_timeout_ms=100)
    other = other_connection(db_path)
    try:
        other.execute("BEGIN IMMEDIATE")  # another process writing past our busy_timeout
        ops = saves(msg("busy/t"), msg("busy/t"))
        with pytest.raises(StoreError) as caught:
            await store.write(ops)
        assert type(caught.value) is StoreError and caught.value.retryable
        assert "database is locked" in str(caught.value)
        with pytest.raises(StoreError) as claim_caught:
            await store.claim_replay("c", {"busy/t": 1.0})
        assert type(claim_caught.value) is StoreError
        other.execute("COMMIT")
        await store.write(ops)
        assert await stored_ids(store, "busy/t") == [op.message.msgid for op in ops]
    finally:
        other.close()
        await store.close()


@pytest.fixture
def file_size_limit() -> Iterator[None]:
    """SIGXFSZ ignored (a write beyond RLIMIT_FSIZE then fails with EFBIG instead of
    killing the process); the fixture restores the limit and the handler."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


async def test_file_that_cannot_grow_is_a_transient_error(db_path: Path, file_size_limit: None) -> None:
    # a full disk, as SQLite meets it: the WAL cannot grow (IOERR_WRITE / FULL)
    store = await open_store(db_path)
    try:
        await store.write(saves(msg("full/t")))
        sizes = [await asyncio.to_thread(os.path.getsize, f) for f in (db_path, f"{db_path}-wal")]
        grown = max(sizes) + 64 * 1024
        _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (grown, hard))
        ops = saves(*[msg("full/t", os.urandom(1000)) for _ in range(500)])
        with pytest.raises(StoreError) as caught:
            await store.write(ops)
        assert type(caught.value) is StoreError and caught.value.retryable
        assert "SQLITE_IOERR" in str(caught.value) or "SQLITE_FULL" in str(caught.value)
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, hard))
        await store.write(ops)
        assert len(await read_topic(store, "full/t")) == 501
    finally:
        await store.close()


def test_read_only_file_is_transient(tmp_path: Path) -> None:
    # SQLite's own error for a file that cannot be written (as root, permissions do
    # not bite, so the file is opened read-only the way SQLite does it for one)
    path = tmp_path / "ro.sqlite3"
    other_connection(path).execute("CREATE TABLE t(a)")
    ro = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        with pytest.raises(sqlite3.OperationalError) as caught:
            ro.execute("INSERT INTO t VALUES (1)")
    finally:
        ro.close()
    error = classify(caught.value, str(path), writing=True)
    assert type(error) is StoreError and error.retryable
    assert "SQLITE_READONLY" in str(error)


# -- the schema changed under a running service: a setup error, not about any op --------
async def test_missing_table_at_write_time_is_a_config_error(store: SqliteStore, db_path: Path) -> None:
    admin = other_connection(db_path)
    admin.execute("DROP TABLE mqtt_msg")
    admin.execute("ALTER TABLE mqtt_sub RENAME TO mqtt_sub_old")
    admin.close()
    with pytest.raises(StoreConfigError) as caught:
        await store.write(saves(msg("gone/t")))
    assert "no such table" in str(caught.value) and not caught.value.retryable
    assert not isinstance(caught.value, WriteRejected)
    with pytest.raises(StoreConfigError):
        await store.save_subscription("c", "t", 1)


async def test_missing_column_at_write_time_is_a_config_error(store: SqliteStore, db_path: Path) -> None:
    admin = other_connection(db_path)
    admin.execute("DROP INDEX mqtt_replay_tombstone_expires")
    admin.execute("ALTER TABLE mqtt_replay_tombstone DROP COLUMN expires")
    admin.close()
    with pytest.raises(StoreConfigError) as caught:
        await store.write([DeleteMessage(msgid(), "t", replay_ack=True)])
    assert "expires" in str(caught.value)


# -- reads ---------------------------------------------------------------------------
async def test_read_with_text_sqlite_cannot_take_is_not_retryable(store: SqliteStore) -> None:
    with pytest.raises(StoreError) as caught:
        await store.subscriptions("c\ud800")
    assert not caught.value.retryable and not isinstance(caught.value, WriteRejected)


async def test_mixed_batch_regrouped_keeps_the_outcome_and_names_the_refused_op(
        store: SqliteStore, db_path: Path) -> None:
    """A batch regrouped by kind (storage.runs) has the outcome of its order, and a
    refusal inside a regrouped run names the op's place in the batch."""
    acked = [msg("mixs/t", b"old%d" % i) for i in range(3)]
    await store.write(saves(*acked))
    new = [msg("mixs/t", b"new%d" % i) for i in range(3)]
    await store.write([SaveMessage(new[0]), DeleteMessage(acked[0].msgid, "mixs/t"), SaveMessage(new[1]),
                       DeleteMessage(acked[1].msgid, "mixs/t"), SaveMessage(new[2]),
                       DeleteMessage(new[1].msgid, "mixs/t")])
    assert [m.payload for m in await read_topic(store, "mixs/t")] == [b"old2", b"new0", b"new2"]
    await store.write([DeleteMessage(acked[2].msgid, "mixs/t"), SaveMessage(acked[2])])  # resent after its ack
    assert acked[2].msgid in await stored_ids(store, "mixs/t")
    admin = other_connection(db_path)
    admin.execute("CREATE TRIGGER no_forbidden BEFORE INSERT ON mqtt_msg WHEN NEW.payload = x'666f7262' "
                  "BEGIN SELECT RAISE(ABORT, 'forbidden'); END")
    admin.close()
    bad = msg("mixs/t", b"forb")
    ops: list[WriteOp] = [SaveMessage(msg("mixs/t")), DeleteMessage(new[0].msgid, "mixs/t"), SaveMessage(bad),
                          DeleteMessage(new[2].msgid, "mixs/t")]
    with pytest.raises(WriteRejected) as caught:
        await store.write(ops)
    assert (caught.value.reason, caught.value.index) == ("constraint", 2)
