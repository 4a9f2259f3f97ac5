"""How the MySQL store classifies what it cannot write (issue 10), against the real
MariaDB: poison values mixed with good ones (each good one stored byte-exact, each
bad one refused with its reason, nothing half-written), the server's own refusals
(with and without the op's index), duplicate keys, schema changes under a running
store, and DropPendingReplay. Transient failures are in tests/test_mysql_transient.py.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

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
from storage.mysql import MysqlStore
from tests.mysql_fixtures import MakeStore, ids, msg, q, read_topic, rejected, spy_statements, write_isolating

# insert_message_sql in a shape the store does not parse: it cannot tell which column
# a value goes to, so only the server can refuse an over-long topic
INSERT_SET = ("insert into mqtt_msg set msgid = ${id}, sender = ${from}, topic = ${topic}, qos = ${qos}, "
              "retain = ${flags.retain}, payload = ${payload}, arrived = FROM_UNIXTIME(${timestamp}/1000)")
MESSAGE_TABLE = (  # the plugin's table, with room for a constraint of the operator's
    "CREATE TABLE mqtt_msg (id bigint unsigned NOT NULL AUTO_INCREMENT PRIMARY KEY, msgid varchar(64), "
    "topic varchar(180) NOT NULL, sender varchar(64), qos tinyint(1) NOT NULL DEFAULT 0, retain tinyint(1), "
    "payload longblob, arrived datetime NOT NULL, KEY (topic), KEY (msgid){extra}) DEFAULT CHARSET=utf8mb4"
)


def good_messages() -> list[StoredMessage]:
    return [
        msg("t/nul\x00inside", b"\x00\x01\x00"),
        msg("t/emoji/\U0001f600", "\U0001f600".encode()),
        msg("t/'; DROP TABLE mqtt_msg; --\\", b"'); DELETE FROM mqtt_msg; -- %s ${id}", sender="x' OR '1'='1"),
        msg("t/" + "\u00e9" * 170, b"accents"),  # 172 characters (344 bytes): varchar(180) counts characters
        msg("t/empty", b"", qos=2, retain=True),
        msg("t/big", os.urandom(8 << 20)),
    ]


def poison_messages() -> dict[str, tuple[StoredMessage, str]]:
    """msgid -> (message, the reason it is refused with by the default templates)."""
    bad = [
        (msg("t/qos", qos=255), "out_of_range"),
        (msg("t/ts", ts=2**64 - 1), "out_of_range"),
        (msg("t/ts", ts=-1), "out_of_range"),
        (msg("t/id", msgid="F" * 100), "too_long"),
        (msg("t/" + "x" * 298), "too_long"),  # 300 bytes > varchar(180)
        (msg("t/" + "y" * 65533), "too_long"),  # 65,535 bytes
        (msg("t/payload", b"\x01" * (16 << 20)), "too_large"),  # 16 MiB > max_allowed_packet
        (msg("t/\udc80surrogate"), "invalid_value"),
        (msg("t/sender", sender="\ud800"), "invalid_value"),
    ]
    return {m.msgid: (m, reason) for m, reason in bad}


def interleaved(good: list[StoredMessage], bad: list[StoredMessage]) -> list[WriteOp]:
    ops: list[WriteOp] = []
    for i in range(max(len(good), len(bad))):
        ops += [SaveMessage(m) for m in (good[i : i + 1] + bad[i : i + 1])]
    return ops


async def assert_stored_exactly(store: MysqlStore, raw: Any, good: list[StoredMessage]) -> None:
    for m in good:
        got = await read_topic(store, m.topic)
        assert [(x.msgid, x.topic, x.sender, x.qos, x.retain, x.payload) for x in got] == [
            (m.msgid, m.topic, m.sender, m.qos, m.retain, m.payload)
        ], m.topic[:40]
    assert q(raw, "SELECT COUNT(*) FROM mqtt_msg") == [(len(good),)]


# ---------------------------------------------------------------------------
# values refused before the first round trip
# ---------------------------------------------------------------------------


async def test_poison_mixed_with_good_messages(make_store: MakeStore, raw: Any,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    store = await make_store()
    good, poison = good_messages(), poison_messages()
    ops = interleaved(good, [m for m, _ in poison.values()])
    ops.insert(1, SaveMessage(good[0]))  # the same message twice in one batch: stored once
    statements = spy_statements(monkeypatch)
    first = await rejected(store, ops)
    assert (first.index, first.reason) == (2, "out_of_range") and "qos 255" in first.detail
    assert statements == []  # nothing was sent
    refused = await write_isolating(store, ops)
    assert {op.message.msgid: reason for op, reason in refused if isinstance(op, SaveMessage)} == {
        msgid: reason for msgid, (_, reason) in poison.items()
    }
    await assert_stored_exactly(store, raw, good)


async def test_ids_the_bookkeeping_cannot_hold_are_refused_by_index(
    make_store: MakeStore, raw: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await make_store()
    m = msg("ids/t")
    statements = spy_statements(monkeypatch)
    cases: list[tuple[WriteOp, str]] = [
        (DeleteMessage("\u00e9" * 32, m.topic, replay_ack=True), "invalid_id"),  # a tombstone key: ASCII
        (RekeyMessage(m.msgid, "A" * 65, m.topic), "invalid_id"),  # the tombstone lookup
        (DropPendingReplay(m.topic, "d", "B" * 100), "invalid_id"),
        (DeleteMessage("\udcff", m.topic), "invalid_value"),
    ]
    for op, reason in cases:
        err = await rejected(store, [SaveMessage(m), op])
        assert (err.index, err.reason) == (1, reason), op
    assert statements == []
    # a plain ack of an id no message has is not an error: it deletes nothing
    await store.write([SaveMessage(m), DeleteMessage("C" * 100, m.topic)])
    assert [x.msgid for x in await read_topic(store, m.topic)] == [m.msgid]


async def test_sender_too_long_is_cut_not_refused(make_store: MakeStore, raw: Any) -> None:
    store = await make_store()
    m = msg("cut/t", sender="\U0001f600" * 100)  # varchar(64) counts characters
    await store.write([SaveMessage(m)])
    assert [x.sender for x in await read_topic(store, "cut/t")] == ["\U0001f600" * 64]


async def test_subscriptions_stored_exactly_or_refused(make_store: MakeStore, raw: Any) -> None:
    store = await make_store()
    clients = ["c/nul\x00inside", "c/emoji/\U0001f600", "\"; DROP TABLE mqtt_sub; #", "c" * 64]
    for clientid in clients:
        await store.save_subscription(clientid, "t/\U0001f600/#", 1)
    for clientid, topic, qos, reason in [
        ("c" * 100, "t/#", 1, "too_long"),  # the plugin's varchar(64)
        ("c", "t/" + "x" * 200, 1, "too_long"),  # varchar(180)
        ("c\udc80", "t/#", 1, "invalid_value"),
        ("c", "t/\ud800", 1, "invalid_value"),
        ("c", "t/#", 3, "out_of_range"),
    ]:
        with pytest.raises(WriteRejected) as err:
            await store.save_subscription(clientid, topic, qos)
        assert err.value.reason == reason and "\n" not in str(err.value)
    for clientid in clients:
        assert [(x.topic, x.qos) for x in await store.subscriptions(clientid)] == [("t/\U0001f600/#", 1)]
    assert q(raw, "SELECT COUNT(*) FROM mqtt_sub") == [(len(clients),)]


# ---------------------------------------------------------------------------
# refused by the server
# ---------------------------------------------------------------------------


async def test_template_the_store_does_not_parse(make_store: MakeStore, raw: Any) -> None:
    store = await make_store(sql={"insert_message_sql": INSERT_SET})
    good = good_messages()[:5]
    existing = msg("t/existing")
    await store.write([SaveMessage(existing)])
    # the server refuses the topic: the message is named, and the delete before it is undone
    too_long = msg("t/" + "x" * 298)
    err = await rejected(store, [SaveMessage(good[0]), DeleteMessage(existing.msgid, existing.topic),
                                 SaveMessage(too_long), SaveMessage(good[1])])
    assert (err.index, err.reason) == (2, "too_long") and "[1406]" in err.detail
    assert [x.msgid for x in await read_topic(store, "t/existing")] == [existing.msgid]
    assert await read_topic(store, good[0].topic) == []
    poison = {
        too_long.msgid: (too_long, "too_long"),
        **{k: v for k, v in poison_messages().items() if v[0].topic in ("t/qos", "t/id") or "y" in v[0].topic},
    }
    late = msg("t/ts", ts=2**64 - 1)  # FROM_UNIXTIME returns NULL: [1292] on MariaDB
    ops = interleaved(good, [m for m, _ in poison.values()] + [late])
    refused = {op.message.msgid: reason for op, reason in await write_isolating(store, ops)
               if isinstance(op, SaveMessage)}
    assert {k: v for k, v in refused.items() if k != late.msgid} == {k: r for k, (_, r) in poison.items()}
    assert refused[late.msgid] in ("invalid_value", "constraint")
    await assert_stored_exactly(store, raw, [existing, *good])


async def test_constraint_of_the_operator_without_and_with_index(make_store: MakeStore, raw: Any) -> None:
    q(raw, MESSAGE_TABLE.format(extra=", CONSTRAINT no_forbidden CHECK (payload <> 'forbidden')"))
    store = await make_store()
    good = [msg("chk/t", str(i).encode()) for i in range(4)]
    bad = msg("chk/t", b"forbidden")
    ops: list[WriteOp] = [SaveMessage(good[0]), SaveMessage(good[1]), SaveMessage(bad), SaveMessage(good[2])]
    # one multi-row INSERT: the server does not say which row, the caller splits
    err = await rejected(store, ops)
    assert (err.index, err.reason) == (None, "constraint") and "[4025]" in err.detail
    assert q(raw, "SELECT COUNT(*) FROM mqtt_msg") == [(0,)]
    assert await write_isolating(store, ops) == [(SaveMessage(bad), "constraint")]
    # a statement of one row names it
    err = await rejected(store, [DeleteMessage(good[0].msgid, "chk/t"), SaveMessage(bad)])
    assert (err.index, err.reason) == (1, "constraint")
    await store.write([SaveMessage(good[3])])
    assert [x.msgid for x in await read_topic(store, "chk/t")] == [m.msgid for m in good]


async def test_resent_save_with_a_unique_msgid_stays_idempotent(make_store: MakeStore, raw: Any) -> None:
    q(raw, MESSAGE_TABLE.format(extra=", UNIQUE KEY uniq_msgid (msgid), UNIQUE KEY uniq_sender (sender)"))
    first = await make_store()
    m1, m2 = msg("uniq/t", sender="a"), msg("uniq/t", sender="b")
    await first.write([SaveMessage(m1)])
    # a new instance (nothing remembered) gets the save again, e.g. after a restart
    second = await make_store()
    await second.write([SaveMessage(m1), SaveMessage(m2)])
    assert [x.msgid for x in await read_topic(second, "uniq/t")] == [m1.msgid, m2.msgid]
    # another unique key of the operator's: a rejection like any other
    clash = msg("uniq/t", sender="a")
    err = await rejected(second, [SaveMessage(clash)])
    assert err.reason == "constraint" and "[1062]" in err.detail
    assert [x.msgid for x in await read_topic(second, "uniq/t")] == [m1.msgid, m2.msgid]


async def test_schema_changed_under_a_running_store_is_a_config_error(make_store: MakeStore, raw: Any) -> None:
    store = await make_store()
    await store.write([SaveMessage(msg("schema/t"))])
    # DDL waits for the store's connections: run it off the event loop they need
    await asyncio.to_thread(q, raw, "ALTER TABLE mqtt_msg DROP COLUMN sender")
    with pytest.raises(StoreConfigError, match=r"\[1054\]") as err:
        await store.write([SaveMessage(msg("schema/t"))])
    assert not isinstance(err.value, WriteRejected) and "\n" not in str(err.value)
    await asyncio.to_thread(q, raw, "DROP TABLE mqtt_msg")
    with pytest.raises(StoreConfigError, match=r"\[1146\]"):
        await store.write([SaveMessage(msg("schema/t"))])
    with pytest.raises(StoreConfigError, match=r"\[1146\]"):
        await store.stored_topics("schema/")
    for table in ("mqtt_replay_pending", "mqtt_sub"):
        await asyncio.to_thread(q, raw, f"DROP TABLE {table}")
    with pytest.raises(StoreConfigError, match=r"\[1146\]"):
        await store.write([DropPendingReplay("schema/t", "d", ids())])
    with pytest.raises(StoreConfigError, match=r"\[1146\]"):
        await store.save_subscription("c", "schema/#", 1)


async def test_operations_before_open_fail_as_transient(make_store: MakeStore) -> None:
    store = await make_store(open_=False)
    for call in (store.write([SaveMessage(msg())]), store.save_subscription("c", "t", 1), store.stored_topics("")):
        with pytest.raises(StoreError, match="not open") as err:
            await call
        assert err.value.retryable


# ---------------------------------------------------------------------------
# DropPendingReplay
# ---------------------------------------------------------------------------


async def test_drop_pending_replay_in_order_and_idempotent(make_store: MakeStore, raw: Any) -> None:
    store = await make_store()
    a, b, other = ids(), ids(), ids()
    # two replays of message `a` (two subscribers) and one of `b`, same topic and payload
    await store.register_pending_replays([PendingReplay("p/t", "d", a), PendingReplay("p/t", "d", a),
                                          PendingReplay("p/t", "d", b), PendingReplay("p/u", "d", other)])

    def pending() -> list[str]:
        return [r[0] for r in q(raw, "SELECT msgid FROM mqtt_replay_pending ORDER BY id")]

    m = msg("p/t")
    await store.write([SaveMessage(m), DropPendingReplay("p/t", "d", a), DeleteMessage(m.msgid, m.topic)])
    assert pending() == [a, b, other]  # one of the two entries of `a`
    assert await read_topic(store, "p/t") == []
    await store.write([DropPendingReplay("p/t", "d", a)])
    await store.write([DropPendingReplay("p/t", "d", a), DropPendingReplay("p/t", "x", b)])  # nothing left to drop
    assert pending() == [b, other]
    assert await store.take_pending_replay("p/t", "d") == b
    assert await store.take_pending_replay("p/t", "d") is None
    await store.write([DropPendingReplay("p/u", "d", other), SaveMessage(m)])
    assert pending() == [] and [x.msgid for x in await read_topic(store, "p/t")] == [m.msgid]


async def test_statements_of_one_op_name_it(make_store: MakeStore, raw: Any) -> None:
    """A refusal of a re-key / a delete template names the op (the server said which)."""
    q(raw, MESSAGE_TABLE.format(extra=", CONSTRAINT id_hex CHECK (msgid NOT LIKE '%Z%')"))
    store = await make_store()
    m = msg("rk/t")
    await store.write([SaveMessage(m)])
    err = await rejected(store, [SaveMessage(msg("rk/t")), RekeyMessage(m.msgid, "Z" * 32, m.topic)])
    assert (err.index, err.reason) == (1, "constraint")
    assert [x.msgid for x in await read_topic(store, "rk/t")] == [m.msgid]


async def test_mixed_batch_is_one_statement_per_kind_and_a_refusal_names_its_op(
        make_store: MakeStore, raw: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The mixed load's batches (a save, another message's ack, a save, ...) are
    regrouped (storage.runs): one INSERT and one DELETE, not a round trip per op; the
    outcome is the batch's order's, and a refusal still names the op's place in it."""
    q(raw, MESSAGE_TABLE.format(extra=", CONSTRAINT no_forbidden CHECK (payload <> 'forbidden')"))
    store = await make_store()
    acked = [msg("mix/t", b"old%d" % i) for i in range(3)]
    await store.write([SaveMessage(m) for m in acked])
    new = [msg("mix/t", b"new%d" % i) for i in range(3)]
    seen = spy_statements(monkeypatch)
    ops: list[WriteOp] = [SaveMessage(new[0]), DeleteMessage(acked[0].msgid, "mix/t"), SaveMessage(new[1]),
                          DeleteMessage(acked[1].msgid, "mix/t"), SaveMessage(new[2]),
                          DeleteMessage(new[1].msgid, "mix/t")]  # a message saved and acked in one batch
    await store.write(ops)
    writes = [s.split()[0].upper() for s in seen if s.split()[0].upper() in ("INSERT", "DELETE")]
    assert writes == ["INSERT", "DELETE"]
    assert [m.payload for m in await read_topic(store, "mix/t")] == [b"old2", b"new0", b"new2"]
    # a delete and then a save of the same id (a resend after its ack): the save stays
    again = acked[2]
    await store.write([DeleteMessage(again.msgid, "mix/t"), SaveMessage(again)])
    assert again.msgid in [m.msgid for m in await read_topic(store, "mix/t")]
    # a single-row statement of a regrouped batch names the op by its place in the batch
    bad = msg("mix/t", b"forbidden")
    err = await rejected(store, [DeleteMessage(new[0].msgid, "mix/t"), SaveMessage(bad)])
    assert (err.index, err.reason) == (1, "constraint")


async def test_a_delete_template_keyed_by_topic_keeps_the_batch_order(make_store: MakeStore, raw: Any) -> None:
    """A delete by topic moved after a save on that topic would delete the save: with
    such a template the batch is not regrouped."""
    store = await make_store(sql={"delete_message_sql": "delete from mqtt_msg where topic = ${topic}"})
    old, new = msg("bytopic/t", b"old"), msg("bytopic/t", b"new")
    await store.write([SaveMessage(old)])
    await store.write([DeleteMessage(old.msgid, "bytopic/t"), SaveMessage(new)])
    assert [m.payload for m in await read_topic(store, "bytopic/t")] == [b"new"]
