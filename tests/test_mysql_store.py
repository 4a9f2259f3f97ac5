"""storage/mysql/ (MysqlStore) against a real MariaDB (127.0.0.1:3306, root, no password).

Each test module works in its own database ``ox_<random>`` (dropped afterwards); each
test starts from an empty database. The TLS tests start a second, private mariadbd
(tests/mysql_tls.py) on a free loopback port and stop it by PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
import struct
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import aiomysql
import pymysql
import pytest

from exhook.config import HostPort, SslOptions
from storage.base import StoreConfigError, StoreError, WriteRejected
from storage.model import DeleteMessage, PendingReplay, RekeyMessage, SaveMessage, Subscription
from storage.mysql import STATE_TABLES_DDL
from storage.mysql import reads as mysql_reads
from storage.unreadable import SkippedRows
from tests.lost_reply_proxy import LostReplyProxy
from tests.mysql_fixtures import MakeStore, ids, msg, q, read_topic, rejected, spy_statements
from tests.mysql_tls import Certs, MariaDbServer, make_certs, tools_available
from tests.store_reads import read_all

# The plugin 2.0.0's own DDL, verbatim (blob payload, no msgid index).
PLUGIN_DDL = (
    "CREATE TABLE IF NOT EXISTS `mqtt_msg` (`id` bigint unsigned NOT NULL AUTO_INCREMENT,"
    "`msgid` varchar(64) DEFAULT NULL,`topic` varchar(180) NOT NULL,`sender` varchar(64) DEFAULT NULL,"
    "`qos` tinyint(1) NOT NULL DEFAULT '0',`retain` tinyint(1) DEFAULT NULL,`payload` blob,"
    "`arrived` datetime NOT NULL,PRIMARY KEY (`id`),INDEX topic_index(`topic`))"
    "ENGINE=InnoDB DEFAULT CHARSET=utf8MB4;",
    "CREATE TABLE IF NOT EXISTS `mqtt_sub` (`clientid` varchar(64) NOT NULL,`topic` varchar(180) NOT NULL,"
    "`qos` tinyint(1) NOT NULL DEFAULT '0',PRIMARY KEY (`clientid`, `topic`)) ENGINE=InnoDB DEFAULT CHARSET=utf8MB4;",
)
PLUGIN_INSERT = (  # the plugin's default insert_message_sql, as its connector prepares it
    "insert into mqtt_msg(msgid, sender, topic, qos, retain, payload, arrived) "
    "values(%s, %s, %s, %s, %s, %s, FROM_UNIXTIME(%s/1000))"
)


# ---------------------------------------------------------------------------
# schema
# ---------------------------------------------------------------------------


async def test_default_schema_created_and_reused(make_store: MakeStore, raw: Any) -> None:
    store = await make_store()
    tables = {t for (t,) in q(raw, "SHOW TABLES")}
    assert tables == {"mqtt_msg", "mqtt_sub", "mqtt_replay_mark", "mqtt_replay_tombstone", "mqtt_replay_pending"}
    ddl = q(raw, "SHOW CREATE TABLE mqtt_msg")[0][1]
    assert "`payload` longblob" in ddl and "KEY `topic_index` (`topic`)" in ddl and "KEY `msgid_index`" in ddl
    m = msg()
    await store.write([SaveMessage(m)])
    await store.save_subscription("c1", "t/#", 1)
    # a second start (and a second instance) reuses the tables and their data
    again = await make_store()
    assert [x.msgid for x in await read_topic(again, "t/1")] == [m.msgid]
    assert [s.topic for s in await again.subscriptions("c1")] == ["t/#"]
    assert {t for (t,) in q(raw, "SHOW TABLES")} == tables


async def test_missing_tables_give_one_clear_line(make_store: MakeStore, raw: Any) -> None:
    with pytest.raises(StoreConfigError) as err:
        await make_store(init_default_schema=False)
    text = str(err.value)
    assert "\n" not in text and "`mqtt_msg`" in text and "`mqtt_sub`" in text and "`mqtt_replay_mark`" in text
    assert "init_default_schema" in text
    assert q(raw, "SHOW TABLES") == []  # false = touch no schema
    for ddl in PLUGIN_DDL:
        q(raw, ddl)
    with pytest.raises(StoreConfigError) as err:
        await make_store(init_default_schema=False)
    assert "`mqtt_msg`" not in str(err.value) and "`mqtt_replay_tombstone`" in str(err.value)


async def test_plugin_tables_and_rows_written_by_the_plugin(
    make_store: MakeStore, raw: Any, caplog: pytest.LogCaptureFixture
) -> None:
    for ddl in (*PLUGIN_DDL, *STATE_TABLES_DDL):
        q(raw, ddl)
    ts = 1732470000123
    rows = [
        ("0005F1B4C2D1E2F30A0B0C0D0E0F1011", "dev-1", "plant/1/temp", 1, 0, b"21.5", ts),
        ("000614A2B7C8D9E0F440000012340001", "dev-2", "plant/1/temp", 2, 1, b"\x00\xff\xfe", ts + 1000),
    ]
    for row in rows:
        q(raw, PLUGIN_INSERT, row)
    q(raw, "insert into mqtt_sub(clientid, topic, qos) values(%s, %s, %s) on duplicate key update qos = %s",
      ("sub-1", "plant/+/temp", 1, 1))
    with caplog.at_level(logging.WARNING, logger="storage.mysql"):
        store = await make_store(init_default_schema=False)
    assert "msgid_index" in caplog.text and "longblob" in caplog.text  # advice for the plugin's DDL
    got = await read_topic(store, "plant/1/temp")
    assert [(m.msgid, m.sender, m.topic, m.qos, m.retain, m.payload) for m in got] == [
        (r[0], r[1], r[2], r[3], bool(r[4]), r[5]) for r in rows
    ]
    assert [m.timestamp for m in got] == [ts // 1000 * 1000, (ts + 1000) // 1000 * 1000]  # DATETIME: seconds
    assert got[0].position < got[1].position
    assert [(s.topic, s.qos) for s in await store.subscriptions("sub-1")] == [("plant/+/temp", 1)]
    # BLOB holds 65535 bytes: a larger payload is refused by index before anything is
    # written; the rest of the batch is written when the caller sends it without it
    big, small = msg("plant/2", b"x" * 70_000), msg("plant/2", b"ok")
    err = await rejected(store, [SaveMessage(small), SaveMessage(big)])
    assert (err.reason, err.index) == ("too_large", 1) and "column payload" in err.detail
    assert await read_topic(store, "plant/2") == []
    await store.write([SaveMessage(small)])
    assert [m.msgid for m in await read_topic(store, "plant/2")] == [small.msgid]


async def test_unknown_or_unavailable_placeholders_rejected(make_store: MakeStore) -> None:
    cases = {
        "select_message_sql": ("select * from mqtt_msg where topic = ${foo}", r"unknown placeholder \$\{foo\}"),
        "delete_message_sql": ("delete from mqtt_msg where payload = ${payload}", r"\$\{payload\} is not available"),
        "insert_subscription_sql": ("insert into mqtt_sub values(${clientid}, ${topic}, ${id})", r"\$\{id\}"),
        # the driver's own quotes would put the value outside the literal: injection
        "select_subscriptions_sql": ("select topic, qos from mqtt_sub where clientid = '${clientid}'",
                                     r"\$\{clientid\} inside a quoted literal"),
    }
    cases["select_message_sql_clientid"] = (
        "select * from mqtt_msg where topic = ${topic} and sender = ${clientid}", r"\$\{clientid\} is not available"
    )
    for name, (sql, pattern) in cases.items():
        field_name = name.removesuffix("_clientid")
        with pytest.raises(StoreConfigError, match=pattern) as err:
            await make_store(open_=False, sql={field_name: sql})
        assert f"mysql.{field_name}" in str(err.value)


async def test_template_problems_found_at_open(make_store: MakeStore) -> None:
    with pytest.raises(StoreConfigError, match=r"mysql.select_message_sql: .*topc"):
        await make_store(sql={"select_message_sql": "select * from mqtt_msg where topc = ${topic}"})
    with pytest.raises(StoreConfigError, match=r"mysql.select_message_sql: the result has no column `payload`"):
        await make_store(sql={"select_message_sql": "select id, msgid, topic from mqtt_msg where topic = ${topic}"})
    with pytest.raises(StoreConfigError, match=r"mysql.rekey_message_sql: .*mqtt_msgs"):
        await make_store(sql={"rekey_message_sql": "update mqtt_msgs set msgid = ${new_id} where msgid = ${id}"})


async def test_custom_templates_with_renamed_tables_and_columns(make_store: MakeStore, raw: Any) -> None:
    q(raw, "CREATE TABLE offline_messages (pk bigint unsigned NOT NULL AUTO_INCREMENT PRIMARY KEY, "
           "message_id char(32) NOT NULL, publisher varchar(255), topic_name varchar(255) NOT NULL, "
           "q tinyint NOT NULL, r tinyint NOT NULL, body mediumblob NOT NULL, received_ms bigint NOT NULL, "
           "note varchar(20) NOT NULL, KEY (topic_name), KEY (message_id)) "
           "DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin")
    q(raw, "CREATE TABLE client_filters (cid varchar(100) NOT NULL, filter varchar(255) NOT NULL, "
           "q tinyint NOT NULL, PRIMARY KEY (cid, filter))")
    for ddl in STATE_TABLES_DDL:
        q(raw, ddl)
    sql = {
        "insert_message_sql": 'INSERT INTO offline_messages (message_id, publisher, topic_name, q, r, body, '
                              'received_ms, note) VALUES ("${id}", ${clientid}, ${topic}, ${qos}, ${retain}, '
                              "${payload}, ${timestamp}, '100%');",
        "delete_message_sql": "DELETE FROM offline_messages WHERE message_id = ${id} AND topic_name = ${topic}",
        "select_message_sql": "SELECT pk AS id, message_id AS msgid, publisher AS sender, topic_name AS topic, "
                              "q AS qos, r AS retain, body AS payload, received_ms AS arrived "
                              "FROM offline_messages WHERE topic_name = ${topic} AND note LIKE '100%'",
        "insert_subscription_sql": "INSERT INTO client_filters (cid, filter, q) VALUES (${clientid}, ${topic}, "
                                   "${qos}) ON DUPLICATE KEY UPDATE q = VALUES(q)",
        "select_subscriptions_sql": "SELECT filter AS topic, q AS qos FROM client_filters WHERE cid = ${clientid}",
        "delete_subscription_sql": "DELETE FROM client_filters WHERE cid = ${clientid} AND filter = ${topic}",
        "rekey_message_sql": "UPDATE offline_messages SET message_id = ${new_id} WHERE message_id = ${id}",
    }
    store = await make_store(init_default_schema=False, sql=sql, message_ttl=3600)
    assert {t for (t,) in q(raw, "SHOW TABLES")} == {
        "offline_messages", "client_filters", "mqtt_replay_mark", "mqtt_replay_tombstone", "mqtt_replay_pending"
    }
    now = int(time.time() * 1000)
    old = msg("site/a/x", b"old", ts=now - 7200_000)
    m1 = msg("site/a/x", b"\x00one", ts=now, retain=True, sender="dev-9")
    m2 = msg("site/b/y", b"two", ts=now + 1)
    await store.write([SaveMessage(old), SaveMessage(m1), SaveMessage(m2)])
    assert q(raw, "SELECT message_id, publisher, note FROM offline_messages WHERE message_id = %s", m1.msgid) == [
        (m1.msgid, "dev-9", "100%")
    ]
    assert await store.stored_topics("site/") == ["site/a/x", "site/b/y"]
    highs = await store.latest_positions(["site/a/x", "site/b/y"])
    got = await read_all(store, {t: (None, h) for t, h in highs.items()})
    assert [(m.msgid, m.payload, m.retain, m.sender, m.timestamp) for m in got] == [
        (m1.msgid, b"\x00one", True, "dev-9", now), (m2.msgid, b"two", False, "pub", now + 1)
    ]  # the expired one is never replayed
    assert await store.purge_expired(100) == 1
    new_id = ids()
    await store.write([RekeyMessage(m1.msgid, new_id, m1.topic), DeleteMessage(new_id, m1.topic, True),
                       DeleteMessage(m2.msgid, m2.topic)])
    assert q(raw, "SELECT COUNT(*) FROM offline_messages") == [(0,)]
    await store.save_subscription("c'1", "site/#", 2)
    assert [(s.topic, s.qos) for s in await store.subscriptions("c'1")] == [("site/#", 2)]
    await store.delete_subscription("c'1", "site/#")
    assert q(raw, "SELECT COUNT(*) FROM client_filters") == [(0,)]


# ---------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------


async def test_injection_attempts_are_stored_verbatim(make_store: MakeStore, raw: Any) -> None:
    store = await make_store()
    topic = "t/'; DROP TABLE mqtt_msg; --\\"
    sender = "x' OR '1'='1"
    payload = b"'); DELETE FROM mqtt_msg; -- \\ \" %s ${id}"
    clientid = '"; DROP TABLE mqtt_sub; #'
    m = msg(topic, payload, sender=sender)
    await store.write([SaveMessage(m), SaveMessage(msg("t/other"))])
    await store.save_subscription(clientid, topic, 1)
    await store.save_subscription(clientid, "t/%_", 2)
    got = await read_topic(store, topic)
    assert [(x.topic, x.sender, x.payload) for x in got] == [(topic, sender, payload)]
    assert sorted((s.topic, s.qos) for s in await store.subscriptions(clientid)) == [("t/%_", 2), (topic, 1)]
    assert await store.subscriptions("x' OR '1'='1") == []
    assert q(raw, "SELECT COUNT(*) FROM mqtt_msg") == [(2,)]
    assert "mqtt_sub" in {t for (t,) in q(raw, "SHOW TABLES")}
    assert await store.stored_topics("t/'; ") == [topic]


async def test_binary_payloads_intact(make_store: MakeStore) -> None:
    store = await make_store()
    payloads = [b"", b"\x00", b"\x00" * 1000, bytes(range(256)) * 4, b"\xff\xfe\xc3\x28\xa0\xa1",
                b"\\'\"\x1a\n\r\x00%s", os.urandom(1 << 20), "ünïcødé".encode()]
    msgs = [msg("bin/t", p) for p in payloads]
    await store.write([SaveMessage(m) for m in msgs])
    got = await read_topic(store, "bin/t")
    assert [m.payload for m in got] == payloads
    assert [m.msgid for m in got] == [m.msgid for m in msgs]


async def test_large_batch_is_split_under_max_allowed_packet(
    make_store: MakeStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    store = await make_store()
    store._opened = replace(store.schema, max_packet=4 << 20)  # as if the server allowed 4 MiB
    statements = spy_statements(monkeypatch)
    big = [msg("big/t", os.urandom(900_000)) for _ in range(10)]
    too_big = msg("big/t", b"\x00" * (3 << 20))  # escaped: 6 MiB > 4 MiB
    batch = [SaveMessage(m) for m in [*big[:5], too_big, *big[5:]]]
    err = await rejected(store, batch)
    assert (err.reason, err.index) == ("too_large", 5) and "max_allowed_packet" in err.detail
    assert statements == []  # refused before the first round trip
    await store.write(batch[:5] + batch[6:])
    inserts = [s for s in statements if s.lstrip().lower().startswith("insert into mqtt_msg")]
    assert 3 <= len(inserts) <= 5 and all(len(s) < 4 << 20 for s in inserts)
    assert [m.payload for m in await read_topic(store, "big/t")] == [m.payload for m in big]


async def test_many_saves_are_one_statement_in_one_transaction(
    make_store: MakeStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await make_store()
    statements = spy_statements(monkeypatch)
    commits: list[int] = []
    original_commit = aiomysql.Connection.commit

    async def commit(self: Any) -> None:
        commits.append(1)
        await original_commit(self)

    monkeypatch.setattr(aiomysql.Connection, "commit", commit)
    msgs = [msg(f"batch/{i % 3}", f"p{i}".encode()) for i in range(50)]
    await store.write([*(SaveMessage(m) for m in msgs[:40]), DeleteMessage(msgs[0].msgid, msgs[0].topic),
                       *(SaveMessage(m) for m in msgs[40:])])
    inserts = [s for s in statements if "insert into mqtt_msg" in s]
    # the delete of another message does not cut the saves (storage.runs regroups the batch)
    assert len(inserts) == 1 and inserts[0].count("FROM_UNIXTIME") == 50
    assert len(commits) == 1
    got = await read_all(store, {f"batch/{i}": (None, 1e15) for i in range(3)})
    assert [m.msgid for m in got] == [m.msgid for m in msgs[1:]]
    # acks with the default delete_message_sql: one DELETE ... IN (...) per run of deletes
    statements.clear()
    await store.write([DeleteMessage(m.msgid, m.topic, replay_ack=i % 2 == 0) for i, m in enumerate(msgs[1:])])
    deletes = [s for s in statements if s.startswith("DELETE FROM `mqtt_msg`")]
    assert len(deletes) == 1 and len(commits) == 2
    assert len([s for s in statements if "mqtt_replay_tombstone" in s]) == 1
    assert await read_all(store, {f"batch/{i}": (None, 1e15) for i in range(3)}) == []


async def test_values_a_column_cannot_hold(make_store: MakeStore, raw: Any) -> None:
    store = await make_store()
    long_topic = msg("t/" + "x" * 200)  # mqtt_msg.topic is varchar(180)
    long_sender = msg("cap/t", sender="s" * 100)  # mqtt_msg.sender is varchar(64): cut, it is informational
    err = await rejected(store, [SaveMessage(long_sender), SaveMessage(long_topic)])
    assert (err.reason, err.index) == ("too_long", 1) and "column topic" in err.detail
    await store.write([SaveMessage(long_sender)])
    assert q(raw, "SELECT msgid, sender FROM mqtt_msg") == [(long_sender.msgid, "s" * 64)]
    # a subscription the plugin's varchar(64) / varchar(180) cannot hold: refused, not a config error
    with pytest.raises(WriteRejected, match="clientid") as sub_err:
        await store.save_subscription("c" * 65, "t/#", 1)
    assert sub_err.value.reason == "too_long" and not isinstance(sub_err.value, StoreConfigError)
    with pytest.raises(WriteRejected, match="topic"):
        await store.save_subscription("c", "t/" + "x" * 200, 1)
    assert q(raw, "SELECT COUNT(*) FROM mqtt_sub") == [(0,)]


async def test_other_insert_shapes_use_executemany_in_one_transaction(
    make_store: MakeStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    sql = {"insert_message_sql": "insert into mqtt_msg set msgid = ${id}, sender = ${from}, topic = ${topic}, "
                                 "qos = ${qos}, retain = ${flags.retain}, payload = ${payload}, "
                                 "arrived = FROM_UNIXTIME(${timestamp}/1000)"}
    store = await make_store(sql=sql)
    statements = spy_statements(monkeypatch)
    msgs = [msg("set/t", bytes([i]) * i) for i in range(5)]
    await store.write([SaveMessage(m) for m in msgs])
    assert len([s for s in statements if s.startswith("insert into mqtt_msg set")]) == 5
    assert [(m.msgid, m.payload) for m in await read_topic(store, "set/t")] == [(m.msgid, m.payload) for m in msgs]
    assert await store.stored_topics("set/") == ["set/t"]  # table and topic column: the defaults


async def test_read_merges_topics_in_position_order_with_ranges(make_store: MakeStore) -> None:
    store = await make_store()
    rnd = random.Random(7)
    topics = ["ord/a", "ord/b", "ord/c", "ord/d"]
    weights = [60, 25, 10, 5]
    msgs = [msg(rnd.choices(topics, weights)[0], str(i).encode()) for i in range(450)]
    for start in range(0, len(msgs), 64):
        await store.write([SaveMessage(m) for m in msgs[start : start + 64]])
    highs = await store.latest_positions([*topics, "ord/none"])
    assert set(highs) == set(topics)
    everything = await read_all(store, {t: (None, highs[t]) for t in topics}, page_size=7)
    assert [m.msgid for m in everything] == [m.msgid for m in msgs]
    positions = [m.position for m in everything]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)
    by_topic = {t: [m for m in everything if m.topic == t] for t in topics}
    # per-topic (low, high] ranges
    ranges: dict[str, tuple[float | None, float]] = {
        "ord/a": (by_topic["ord/a"][100].position, by_topic["ord/a"][200].position),
        "ord/b": (None, by_topic["ord/b"][20].position),
        "ord/c": (by_topic["ord/c"][-1].position, highs["ord/c"]),  # empty
        "ord/d": (by_topic["ord/d"][3].position, highs["ord/d"] + 1000),
    }
    expected = [m for m in everything if (lambda r: (r[0] is None or m.position > r[0]) and m.position <= r[1])(
        ranges[m.topic])]
    for page in (1, 3, 100, 1000):
        assert [m.msgid for m in await read_all(store, ranges, page)] == [m.msgid for m in expected]
        for topic, rng in ranges.items():  # one topic alone: read without a merge
            assert [m.msgid for m in await read_all(store, {topic: rng}, page)] == [
                m.msgid for m in expected if m.topic == topic]
    assert await read_all(store, {}, 10) == []


async def test_one_topic_is_read_a_page_per_statement(make_store: MakeStore, monkeypatch: pytest.MonkeyPatch) -> None:
    store = await make_store()
    msgs = [msg("page/t", b"%d" % i) for i in range(25)]
    await store.write([SaveMessage(m) for m in msgs])
    high = (await store.latest_positions(["page/t"]))["page/t"]
    statements = spy_statements(monkeypatch)
    got = await read_all(store, {"page/t": (None, high)}, page_size=10)
    assert [m.msgid for m in got] == [m.msgid for m in msgs]
    assert len(statements) == 3  # 10 + 10 + 5 rows


async def test_wildcard_discovery_by_prefix_and_exact_topics(make_store: MakeStore) -> None:
    store = await make_store()
    topics = ["a/b/1", "a/b/2", "a/c", "A/b/3", "A/B/1", "a/b/1 ", "b/x", "x_y/1", "xzy/1", "p%q/1", "pzq/1",
              "a/b"]
    msgs = {t: msg(t, t.encode()) for t in topics}
    await store.write([SaveMessage(m) for m in msgs.values()])
    assert await store.stored_topics("a/b/") == ["a/b/1", "a/b/1 ", "a/b/2"]
    assert await store.stored_topics("A/") == ["A/B/1", "A/b/3"]
    assert await store.stored_topics("x_y/") == ["x_y/1"]
    assert await store.stored_topics("p%q/") == ["p%q/1"]
    assert await store.stored_topics("") == sorted(topics)
    assert await store.stored_topics("zzz/") == []
    highs = await store.latest_positions(["a/b/1", "A/B/1", "a/b/1 "])
    assert len(set(highs.values())) == 3  # case and trailing space make different topics
    for t in ("a/b/1", "A/B/1", "a/b/1 "):
        assert [m.payload for m in await read_topic(store, t)] == [t.encode()]
        assert highs[t] == (await read_topic(store, t))[0].position


async def test_lifecycle_leaves_both_tables_empty(make_store: MakeStore, raw: Any) -> None:
    store = await make_store()
    m1, m2 = msg("life/1", b"a"), msg("life/1", b"b")
    await store.write([SaveMessage(m1), SaveMessage(m2)])
    await store.save_subscription("client-1", "life/+", 1)
    highs = await store.latest_positions(await store.stored_topics("life/"))
    prev = await store.claim_replay("client-1@conn", highs)
    replay = await read_all(store, {t: (prev[t], h) for t, h in highs.items()})
    assert [m.msgid for m in replay] == [m1.msgid, m2.msgid]
    await store.write([DeleteMessage(m.msgid, m.topic) for m in replay])
    await store.delete_subscription("client-1", "life/+")
    assert q(raw, "SELECT COUNT(*) FROM mqtt_msg") == [(0,)]
    assert q(raw, "SELECT COUNT(*) FROM mqtt_sub") == [(0,)]


async def test_pool_is_bounded_by_pool_size(make_store: MakeStore) -> None:
    store = await make_store(pool_size=2)
    await store.write([SaveMessage(msg("pool/t")) for _ in range(5)])
    results = await asyncio.gather(*(read_topic(store, "pool/t") for _ in range(12)))
    assert all(len(r) == 5 for r in results)
    assert store._db.pool.size <= 2


# ---------------------------------------------------------------------------
# re-key, tombstones, retries
# ---------------------------------------------------------------------------


async def count(raw: Any, msgid: str) -> int:
    return int(q(raw, "SELECT COUNT(*) FROM mqtt_msg WHERE msgid = %s", (msgid,))[0][0])


async def test_rekey_keeps_position_then_ack_deletes(make_store: MakeStore, raw: Any) -> None:
    store = await make_store()
    m = msg("rk/t")
    await store.write([SaveMessage(m)])
    pos = (await read_topic(store, "rk/t"))[0].position
    new = ids()
    await store.write([RekeyMessage(m.msgid, new, m.topic)])
    got = await read_topic(store, "rk/t")
    assert [(x.msgid, x.position) for x in got] == [(new, pos)]
    await store.write([DeleteMessage(new, m.topic, replay_ack=True)])
    assert await read_topic(store, "rk/t") == []


async def test_ack_before_rekey_is_honoured_by_the_tombstone(make_store: MakeStore, raw: Any) -> None:
    store = await make_store()
    for together in (False, True):
        m, new = msg("tomb/t"), ids()
        ops = [SaveMessage(m), DeleteMessage(new, m.topic, replay_ack=True), RekeyMessage(m.msgid, new, m.topic)]
        if together:
            await store.write(ops)
        else:
            for op in ops:
                await store.write([op])
        assert await count(raw, m.msgid) == 0 and await count(raw, new) == 0
    # a non-replay ack leaves no tombstone; an expired tombstone is ignored
    m, new = msg("tomb/t"), ids()
    await store.write([SaveMessage(m), DeleteMessage(new, m.topic, replay_ack=True)])
    q(raw, "UPDATE mqtt_replay_tombstone SET expires = 0 WHERE msgid = %s", (new,))
    await store.write([RekeyMessage(m.msgid, new, m.topic)])
    assert await count(raw, new) == 1
    await store.write([DeleteMessage(new, m.topic)])
    assert q(raw, "SELECT COUNT(*) FROM mqtt_msg") == [(0,)]


async def test_rekey_and_ack_racing_on_two_instances(make_store: MakeStore, raw: Any) -> None:
    a, b = await make_store(), await make_store()
    for i in range(25):
        m, new = msg("race/t"), ids()
        await a.write([SaveMessage(m)])
        rekey = a.write([RekeyMessage(m.msgid, new, m.topic)])
        ack = b.write([DeleteMessage(new, m.topic, replay_ack=True)])
        await asyncio.gather(*((rekey, ack) if i % 2 else (ack, rekey)))
        assert await count(raw, new) == 0 and await count(raw, m.msgid) == 0, i


async def test_retry_after_lost_commit_does_not_duplicate(
    make_store: MakeStore, raw: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await make_store()
    original = aiomysql.Connection.commit
    lost = [2]

    async def commit_then_lose_reply(self: Any) -> None:
        await original(self)
        if lost[0]:
            lost[0] -= 1
            raise pymysql.err.OperationalError(2013, "Lost connection to server during query")

    monkeypatch.setattr(aiomysql.Connection, "commit", commit_then_lose_reply)
    m1, m2, gone = msg("retry/t"), msg("retry/t"), msg("retry/t")
    batch = [SaveMessage(m1), SaveMessage(gone), DeleteMessage(gone.msgid, gone.topic), SaveMessage(m2)]
    # committed, reply lost; the store repeats once on a new connection: committed, lost again
    with pytest.raises(StoreError, match="2013"):
        await store.write(batch)
    assert lost == [0]
    assert [await count(raw, x.msgid) for x in (m1, m2, gone)] == [1, 1, 0]  # no duplicate so far
    await store.write(batch)  # the writer's retry of the whole batch
    assert [await count(raw, x.msgid) for x in (m1, m2, gone)] == [1, 1, 0]
    assert store._writes.uncertain == {}
    # a duplicate row that got in anyway is replayed once, and one ack removes both rows
    q(raw, PLUGIN_INSERT, (m1.msgid, "pub", "retry/t", 1, 0, b"dup", int(time.time() * 1000)))
    assert [x.msgid for x in await read_topic(store, "retry/t")] == [m1.msgid, m2.msgid]
    await store.write([DeleteMessage(m1.msgid, m1.topic)])
    assert await count(raw, m1.msgid) == 0


async def test_duplicates_are_found_in_a_bounded_window(
    make_store: MakeStore, raw: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the ids one replay remembers stay within the window, however long the replay
    monkeypatch.setattr(mysql_reads, "_DEDUP_WINDOW", 16)
    sizes: list[int] = []
    first_time = mysql_reads.RecentIds.first_time

    def spy(self: mysql_reads.RecentIds, msgid: str) -> bool:
        fresh = first_time(self, msgid)
        sizes.append(len(self))
        return fresh

    monkeypatch.setattr(mysql_reads.RecentIds, "first_time", spy)
    store = await make_store()
    ms = [msg(f"win/{i % 3}", b"%d" % i) for i in range(300)]
    for start in range(0, len(ms), 50):
        await store.write([SaveMessage(m) for m in ms[start : start + 50]])
    # a retried batch stored its last messages again right after them
    now = int(time.time() * 1000)
    for m in ms[-10:]:
        q(raw, "INSERT INTO mqtt_msg(msgid, sender, topic, qos, retain, payload, arrived) "
               "VALUES (%s, 'pub', %s, 1, 0, 'dup', FROM_UNIXTIME(%s/1000))", (m.msgid, m.topic, now))
    topics = ["win/0", "win/1", "win/2"]
    for page in (1, 7, 100):
        sizes.clear()
        got = await read_all(store, {t: (None, 1e15) for t in topics}, page)
        assert [m.msgid for m in got] == [m.msgid for m in ms]
        assert len(sizes) == 310 and max(sizes) == 16  # 310 rows met, never more than 16 ids held
    # one topic alone (no merge): its copies are skipped too
    got = await read_all(store, {"win/0": (None, 1e15)}, 7)
    assert [m.msgid for m in got] == [m.msgid for m in ms if m.topic == "win/0"]


async def test_unreadable_rows_are_skipped(make_store: MakeStore, raw: Any, monkeypatch: pytest.MonkeyPatch,
                                           caplog: pytest.LogCaptureFixture) -> None:
    # the plugin's table lets another writer leave rows no message can come from
    for ddl in (*PLUGIN_DDL, *STATE_TABLES_DDL):
        q(raw, ddl)
    q(raw, "ALTER TABLE mqtt_msg MODIFY qos varchar(8) NULL")  # a custom schema's looser column
    skipped = SkippedRows("mysql")
    monkeypatch.setattr(mysql_reads, "SKIPPED", skipped)
    store = await make_store(init_default_schema=False)
    good = [msg("bad/t", b"%d" % i) for i in range(3)]
    await store.write([SaveMessage(good[0])])
    ts = int(time.time() * 1000)
    for mid, qos, payload in [(ids(), 1, None), (ids(), 3, b"qos 3"), (ids(), 2, b"ok"), (None, 1, b"no msgid"),
                              (ids(), -1, b"qos -1"), (ids(), 0, b""), (ids(), 1, ""), (ids(), None, b"qos NULL"),
                              (ids(), "x", b"qos x"), (ids(), " 2", b"qos text")]:
        q(raw, PLUGIN_INSERT, (mid, "tool", "bad/t", qos, 0, payload, ts))
    await store.write([SaveMessage(m) for m in good[1:]])
    await store.write([SaveMessage(msg("bad/u"))])
    caplog.set_level(logging.WARNING, logger="storage.mysql.reads")
    for ranges in ({"bad/t": (None, 1e15)}, {"bad/t": (None, 1e15), "bad/u": (None, 1e15)}):
        for page in (1, 2, 100):
            got = await read_all(store, ranges, page)
            # qos 3 and -1 are read as they are: the replay leaves them out and counts them (bad_qos)
            assert [(m.qos, m.payload) for m in got if m.topic == "bad/t"] == [
                (1, b"0"), (3, b"qos 3"), (2, b"ok"), (-1, b"qos -1"), (0, b""), (1, b""), (2, b"qos text"), (1, b"1"),
                (1, b"2")]
    assert skipped.count == 6 * 4  # 4 unreadable rows (payload, msgid, qos NULL, qos x), read 6 times
    lines = [r.getMessage() for r in caplog.records if "skipping unreadable stored message" in r.getMessage()]
    assert len(lines) == 1 and "payload is NULL" in lines[0], lines  # one line a minute


# ---------------------------------------------------------------------------
# replay bookkeeping
# ---------------------------------------------------------------------------


async def test_claim_replay_marks(make_store: MakeStore, raw: Any) -> None:
    store = await make_store()
    assert await store.claim_replay("c1", {}) == {}
    assert await store.claim_replay("c1", {"t/a": 5, "t/b": 7}) == {"t/a": None, "t/b": None}
    assert await store.claim_replay("c1", {"t/a": 9, "t/b": 3, "t/c": 1}) == {"t/a": 5, "t/b": 7, "t/c": None}
    assert await store.claim_replay("c1", {"t/a": 9, "t/b": 8}) == {"t/a": 9, "t/b": 7}  # raised, never lowered
    assert await store.claim_replay("c2", {"t/a": 1}) == {"t/a": None}
    await store.reset_replay_marks("c1")
    assert await store.claim_replay("c1", {"t/a": 2}) == {"t/a": None}
    await store.save_subscription("fresh", "t/#", 1)
    assert await store.fresh_session_subscriptions("fresh", "c1") == [Subscription("t/#", 1)]
    assert await store.claim_replay("c1", {"t/a": 2}) == {"t/a": None}  # forgotten
    assert await store.claim_replay("c2", {"t/a": 1}) == {"t/a": 1}
    q(raw, "UPDATE mqtt_replay_mark SET expires = 0")
    assert await store.claim_replay("c2", {"t/a": 1}) == {"t/a": None}  # expired mark = never replayed
    long_id = "client-" + "x" * 5000 + "@node/10.0.0.1:5555"
    assert await store.claim_replay(long_id, {"t/" + "y" * 3000: 4}) == {"t/" + "y" * 3000: None}


async def test_concurrent_claims_one_winner(make_store: MakeStore) -> None:
    a, b = await make_store(pool_size=4), await make_store(pool_size=4)
    for round_ in range(3):
        conn = f"conn-{round_}"
        highs = {f"cc/{i}": float(10 + i) for i in range(6)}
        # opposite key orders and two instances: no deadlock, exactly one first claim
        claims = [(a if i % 2 else b).claim_replay(conn, dict(reversed(highs.items())) if i % 3 else highs)
                  for i in range(10)]
        results = await asyncio.gather(*claims)
        firsts = [r for r in results if all(v is None for v in r.values())]
        assert len(firsts) == 1
        assert all(r == highs for r in results if r is not firsts[0])


async def test_claim_of_one_topic_is_one_statement(make_store: MakeStore, monkeypatch: pytest.MonkeyPatch) -> None:
    store = await make_store()
    await store.claim_replay("warm-up", {"o/a": 1.0})  # the store checks the statement once
    statements = spy_statements(monkeypatch)
    assert await store.claim_replay("one", {"o/a": 5.0}) == {"o/a": None}
    assert await store.claim_replay("one", {"o/a": 8.0}) == {"o/a": 5.0}
    assert await store.claim_replay("one", {"o/a": 6.0}) == {"o/a": 8.0}  # never lowered
    assert await store.claim_replay("one", {"o/a": 9.0}) == {"o/a": 8.0}
    assert len(statements) == 4 and all("LAST_INSERT_ID" in sql for sql in statements)
    # a position that is not a message id (not an integer) takes the transaction
    assert await store.claim_replay("one", {"o/a": 9.5}) == {"o/a": 9.0}
    # and a fractional mark is read as the message id it covers (reads floor it too), never lowered
    assert await store.claim_replay("one", {"o/a": 9.0}) == {"o/a": 9.0}
    assert await store.claim_replay("one", {"o/a": 10.0}) == {"o/a": 9.0}
    assert await store.claim_replay("one", {"o/a": 10.0}) == {"o/a": 10.0}


async def test_concurrent_claims_of_one_topic_one_winner(make_store: MakeStore) -> None:
    a, b = await make_store(pool_size=4), await make_store(pool_size=4)
    for round_ in range(3):
        conn = f"one-conn-{round_}"
        results = await asyncio.gather(*[(a if i % 2 else b).claim_replay(conn, {"oc/t": 42.0}) for i in range(10)])
        assert sorted(results, key=lambda r: r["oc/t"] is not None) == [{"oc/t": None}] + [{"oc/t": 42.0}] * 9


@pytest.mark.parametrize("lost", [1, 2])
async def test_claim_whose_answer_is_lost_replays_from_the_oldest(make_store: MakeStore, lost: int) -> None:
    """The claim ran but its answer was lost with the connection (once, or twice in a
    row): claiming again would take its own mark for the previous one and replay
    nothing (a gap). The next claim of that connection and topic answers None."""
    direct = await make_store()
    assert await direct.claim_replay("lost-answer", {"la/t": 5.0}) == {"la/t": None}
    armed = False
    async with LostReplyProxy(("127.0.0.1", 3306), lambda chunk: armed and b"LAST_INSERT_ID" in chunk,
                              times=lost) as proxy:
        through = await make_store(server=HostPort("127.0.0.1", proxy.port))
        await through.claim_replay("warm-up", {"wu/t": 1.0})  # the store's check of the statement
        armed = True
        for _ in range(lost):
            with pytest.raises(StoreError, match="2013"):
                await through.claim_replay("lost-answer", {"la/t": 9.0})
        assert await through.claim_replay("lost-answer", {"la/t": 10.0}) == {"la/t": None}
        assert proxy.lost == lost
        assert await through.claim_replay("lost-answer", {"la/t": 11.0}) == {"la/t": 10.0}  # doubt cleared
    assert await direct.claim_replay("lost-answer", {"la/t": 12.0}) == {"la/t": 11.0}


async def test_claim_of_topics_whose_commit_answer_is_lost_replays_from_the_oldest(make_store: MakeStore) -> None:
    direct = await make_store()
    highs = {"lc/a": 5.0, "lc/b": 6.0}
    assert await direct.claim_replay("lost-commit", highs) == {"lc/a": None, "lc/b": None}
    armed = False
    async with LostReplyProxy(("127.0.0.1", 3306), lambda chunk: armed and b"COMMIT" in chunk.upper()) as proxy:
        through = await make_store(server=HostPort("127.0.0.1", proxy.port))
        await through.claim_replay("warm-up", {"wu/t": 1.0})  # the store's check of the statement
        armed = True
        with pytest.raises(StoreError, match="2013"):
            await through.claim_replay("lost-commit", {"lc/a": 9.0, "lc/b": 9.0})
        assert await through.claim_replay("lost-commit", {"lc/a": 10.0, "lc/b": 10.0}) == {
            "lc/a": None, "lc/b": None}
        assert proxy.lost == 1
    assert await direct.claim_replay("lost-commit", {"lc/a": 10.0}) == {"lc/a": 10.0}


async def test_claim_check_falls_back_to_transactions(make_store: MakeStore, raw: Any,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    store = await make_store()
    assert store._bookkeeping.single_statement_claims is None  # checked at the first claim
    await asyncio.gather(*[store.claim_replay(f"check-{i}", {"ck/t": 5.0}) for i in range(5)])
    assert store._bookkeeping.single_statement_claims is True
    assert q(raw, "SELECT COUNT(*) FROM mqtt_replay_mark")[0][0] == 5  # the check leaves nothing behind
    # a server whose insert id does not carry LAST_INSERT_ID(expr) (simulated: the id is dropped)
    monkeypatch.setattr(aiomysql.Cursor, "lastrowid", property(lambda self: 0))
    other = await make_store()
    assert await other.claim_replay("fallback", {"fb/t": 5.0}) == {"fb/t": None}
    assert other._bookkeeping.single_statement_claims is False
    assert any("replay claims use a transaction" in r.getMessage() for r in caplog.records)
    assert await other.claim_replay("fallback", {"fb/t": 7.0}) == {"fb/t": 5.0}


async def test_pending_replay_registry(make_store: MakeStore, raw: Any) -> None:
    a, b = await make_store(), await make_store()
    await a.register_pending_replays([])
    await a.register_pending_replays([PendingReplay("p/t", "d1", "A"), PendingReplay("p/t", "d1", "B"),
                                      PendingReplay("p/t", "d2", "C"), PendingReplay("p/u", "d1", "D")])
    assert await b.take_pending_replay("p/t", "d1") == "A"  # FIFO
    assert await a.take_pending_replay("p/t", "d1") == "B"
    assert await a.take_pending_replay("p/t", "d1") is None
    assert await b.take_pending_replay("p/t", "d2") == "C"
    assert await b.take_pending_replay("p/u", "d1") == "D"
    await a.register_pending_replays([PendingReplay("p/x", "d", str(i)) for i in range(4)])
    q(raw, "UPDATE mqtt_replay_pending SET expires = 0 WHERE msgid = '0'")
    taken = await asyncio.gather(*((a if i % 2 else b).take_pending_replay("p/x", "d") for i in range(7)))
    assert sorted(t for t in taken if t is not None) == ["1", "2", "3"]  # each popped once, expired never
    assert await a.purge_expired(100) == 0
    assert q(raw, "SELECT COUNT(*) FROM mqtt_replay_pending") == [(0,)]


async def test_ttl_hides_and_purges_expired_messages(make_store: MakeStore, raw: Any) -> None:
    keep = await make_store(message_ttl=0)
    now = int(time.time() * 1000)
    old = [msg("ttl/t", b"old", ts=now - 3600_000) for _ in range(3)]
    new = msg("ttl/t", b"new", ts=now)
    await keep.write([SaveMessage(m) for m in [*old, new]])
    assert len(await read_topic(keep, "ttl/t")) == 4  # 0 = keep until acknowledged
    assert await keep.purge_expired(100) == 0
    store = await make_store(message_ttl=60)
    assert [m.msgid for m in await read_topic(store, "ttl/t")] == [new.msgid]
    assert await store.purge_expired(2) == 2  # bounded
    assert await store.purge_expired(100) == 1
    assert await store.purge_expired(100) == 0
    assert q(raw, "SELECT msgid FROM mqtt_msg") == [(new.msgid,)]
    # expired bookkeeping goes too
    await store.write([DeleteMessage(ids(), "ttl/t", replay_ack=True)])
    q(raw, "UPDATE mqtt_replay_tombstone SET expires = 0")
    await store.purge_expired(100)
    assert q(raw, "SELECT COUNT(*) FROM mqtt_replay_tombstone") == [(0,)]


# ---------------------------------------------------------------------------
# errors, credentials
# ---------------------------------------------------------------------------


async def test_bad_credentials_and_unreachable_server(
    make_store: MakeStore, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "s3cret-Passw0rd"
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(StoreConfigError) as err:
            await make_store(username="no_such_user", password=secret)
        assert secret not in str(err.value) and "\n" not in str(err.value)
        with pytest.raises(StoreConfigError, match="unknown database"):
            await make_store(database="ox_does_not_exist_" + secrets.token_hex(3))
        with pytest.raises(StoreError, match="cannot connect"):
            await make_store(server=HostPort("127.0.0.1", 1), password=secret)
    assert secret not in caplog.text
    closed = await make_store(open_=False)
    with pytest.raises(StoreError, match="not open"):
        await closed.write([SaveMessage(msg())])


async def test_tls_requested_but_server_has_none(make_store: MakeStore) -> None:
    # the shared MariaDB on 3306 has no TLS: aiomysql alone would go on in clear text
    with pytest.raises(StoreConfigError, match="did not offer TLS; nothing was sent"):
        await make_store(ssl=SslOptions(enable=True, verify=False))


async def test_no_credentials_to_a_server_that_drops_the_tls_offer(make_store: MakeStore) -> None:
    """A server (or anyone in between) whose greeting leaves out CLIENT_SSL would get the
    handshake response in clear text, and after an auth switch to mysql_clear_password
    the password itself: nothing may follow the greeting."""
    received = bytearray()

    async def greet_without_tls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        capabilities = 1 | 2 | 4 | 8 | 512 | 8192 | 32768 | (1 << 19)  # CLIENT_SSL (2048) left out
        salt = b"abcdefghijklmnopqrst"
        greeting = (b"\x0a5.7.99-fake\x00" + struct.pack("<I", 7) + salt[:8] + b"\x00"
                    + struct.pack("<H", capabilities & 0xFFFF) + b"\x2d" + struct.pack("<H", 2)
                    + struct.pack("<H", capabilities >> 16) + b"\x15" + b"\x00" * 10 + salt[8:] + b"\x00"
                    + b"mysql_native_password\x00")
        writer.write(struct.pack("<I", len(greeting))[:3] + b"\x00" + greeting)
        await writer.drain()
        with contextlib.suppress(ConnectionError):
            received.extend(await reader.read(65536))
        writer.close()

    server = await asyncio.start_server(greet_without_tls, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(StoreConfigError, match=r"mysql.ssl.enable: .* did not offer TLS; nothing was sent"):
            await make_store(server=HostPort("127.0.0.1", port), password="s3cret-Passw0rd",
                             ssl=SslOptions(enable=True, verify=False))
    finally:
        server.close()
        await server.wait_closed()
    assert received == b""


# ---------------------------------------------------------------------------
# TLS and restarts, on a private mariadbd
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MariaDbServer, Certs]]:
    # scripts/start-services.sh installs these; a missing one must fail, not hide the TLS tests
    assert tools_available(), "openssl / mariadbd / mariadb-install-db not available"
    base = tmp_path_factory.mktemp("mariadb-tls")
    certs = make_certs(base / "certs")
    server = MariaDbServer(base / "server", certs, require_tls=True)
    try:
        server.install()
        server.start()
        with server.connect() as conn, conn.cursor() as cur:
            cur.execute("CREATE DATABASE mqtt")
        yield server, certs
    finally:
        server.stop()


def tls_config(server: MariaDbServer, **ssl: Any) -> dict[str, Any]:
    return {"server": HostPort("127.0.0.1", server.port), "database": "mqtt",
            "ssl": SslOptions(enable=True, **ssl)}


async def test_tls_verify_on(make_store: MakeStore, tls_server: tuple[MariaDbServer, Certs]) -> None:
    server, certs = tls_server
    store = await make_store(**tls_config(server, verify=True, cacertfile=str(certs.ca),
                                          certfile=str(certs.client_cert), keyfile=str(certs.client_key),
                                          server_name_indication="mysql-server"))
    m = msg("tls/t", b"\x00secret")
    await store.write([SaveMessage(m)])
    assert [x.payload for x in await read_topic(store, "tls/t")] == [m.payload]
    await store.write([DeleteMessage(m.msgid, m.topic)])
    # no SNI: the name checked is the host, 127.0.0.1 (in the certificate's SAN)
    plain_name = await make_store(**tls_config(server, verify=True, cacertfile=str(certs.ca)))
    await plain_name.ping()


async def test_tls_verify_failures(make_store: MakeStore, tls_server: tuple[MariaDbServer, Certs]) -> None:
    server, certs = tls_server
    with pytest.raises(StoreError) as err:
        await make_store(**tls_config(server, verify=True, cacertfile=str(certs.other_ca)))
    assert "certificate" in str(err.value).lower() and "\n" not in str(err.value)
    with pytest.raises(StoreError, match=r"(?i)hostname|match"):
        await make_store(**tls_config(server, verify=True, cacertfile=str(certs.ca),
                                      server_name_indication="wrong-name"))
    with pytest.raises(StoreConfigError, match="cacertfile"):
        await make_store(**tls_config(server, verify=True, cacertfile=str(certs.server_key.parent / "nope.pem")))
    with pytest.raises(StoreError):  # plain connection refused by require_secure_transport
        await make_store(server=HostPort("127.0.0.1", server.port), database="mqtt")


async def test_tls_verify_off(make_store: MakeStore, tls_server: tuple[MariaDbServer, Certs]) -> None:
    server, certs = tls_server
    store = await make_store(**tls_config(server, verify=False, cacertfile=str(certs.other_ca),
                                          server_name_indication="wrong-name"))
    await store.ping()
    # "disable" (the plugin's schema default): no SNI, no name check, the chain is still verified
    no_sni = await make_store(**tls_config(server, verify=True, cacertfile=str(certs.ca),
                                           server_name_indication="disable"))
    await no_sni.ping()
    with pytest.raises(StoreError):
        await make_store(**tls_config(server, verify=True, cacertfile=str(certs.other_ca),
                                      server_name_indication="disable"))


async def test_pool_recovers_when_mariadb_restarts(
    make_store: MakeStore, tls_server: tuple[MariaDbServer, Certs]
) -> None:
    server, certs = tls_server
    store = await make_store(pool_size=3, **tls_config(server, verify=True, cacertfile=str(certs.ca)))
    before = msg("restart/t")
    await store.write([SaveMessage(before)])
    await asyncio.gather(*(store._db.query("SELECT SLEEP(0.1)", ()) for _ in range(3)))
    assert store._db.pool.size == 3  # three pooled connections
    server.stop()
    with pytest.raises(StoreError):
        await store.write([SaveMessage(msg("restart/t"))])
    with pytest.raises(StoreError, match="2003"):
        await store.ping()
    # Restarted while the event loop is blocked: the pool still holds connections it
    # does not know are dead. The first operation must succeed anyway.
    await asyncio.gather(*(store._db.query("SELECT SLEEP(0.1)", ()) for _ in range(3)), return_exceptions=True)
    server.stop()
    server.start()
    after = msg("restart/t")
    await store.write([SaveMessage(after)])
    got = [m.msgid for m in await read_topic(store, "restart/t")]
    assert before.msgid in got and after.msgid in got
    assert store._db.pool.size <= 3
