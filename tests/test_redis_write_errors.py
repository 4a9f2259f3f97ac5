"""RedisStore.write: what it refuses (one op, by index, nothing half-written), what is
transient, what is a set-up problem; DropPendingReplay.

Against the real Redis at 127.0.0.1:6379 (single and cluster-phases stores), and
private redis-servers (tests/redis_servers.py) that a test stops, SIGSTOPs or
reconfigures by PID.
"""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import pytest
import redis.asyncio as aioredis

from storage.base import StoreConfigError, StoreError, WriteRejected
from storage.base62 import msgid_to_b62
from storage.config import HostPort, RedisConfig
from storage.model import (
    DeleteMessage,
    DropPendingReplay,
    PendingReplay,
    RekeyMessage,
    SaveMessage,
    StoredMessage,
    Subscription,
    WriteOp,
)
from storage.redis import REDIS_COMMANDS, RedisStore
from tests.redis_fixtures import RedisTopologies
from tests.redis_servers import RedisSingle
from tests.redis_store_support import (
    EVERYTHING,
    acl_user,
    admin,
    guid,
    key_rules,
    make_store,
    mkey,
    now_us,
    prefix,
    save,
    smsg,
    store,
    store_cfg,
    write_setting_aside,
)
from tests.store_reads import read_all

__all__ = ["acl_user", "admin", "make_store", "prefix", "store"]  # fixtures


async def keys_of(admin: aioredis.Redis, prefix: str) -> list[bytes]:
    return sorted([k async for k in admin.scan_iter(match=prefix + "*", count=1000)])


def as_stored(m: StoredMessage) -> tuple[Any, ...]:
    return (m.msgid, m.sender, m.topic, m.qos, m.retain, m.payload, m.timestamp)


# ---------------------------------------------------------------------------
# DropPendingReplay
# ---------------------------------------------------------------------------


async def test_drop_pending_replay_removes_one_entry(store: RedisStore, admin: aioredis.Redis,
                                                     prefix: str) -> None:
    digest, a, b = "ab" * 32, "A" * 32, "B" * 32
    # the same message replayed to two subscribers: two entries of one value
    await store.register_pending_replays([PendingReplay("t/x", digest, a), PendingReplay("t/x", digest, a),
                                          PendingReplay("t/x", digest, b)])
    key = f"{prefix}:msg~ox:pend:{digest}:t/x"
    await store.write([DropPendingReplay("t/x", digest, a)])
    assert await admin.lrange(key, 0, -1) == [a.encode(), b.encode()]
    # an entry that is not there: nothing changes
    await store.write([DropPendingReplay("t/x", digest, "C" * 32), DropPendingReplay("t/y", digest, a)])
    assert await admin.lrange(key, 0, -1) == [a.encode(), b.encode()]
    # in a batch with other ops, in order
    m = smsg(guid(now_us()), "t/x")
    await store.write([SaveMessage(m), DropPendingReplay("t/x", digest, b), DeleteMessage(m.msgid, "t/x"),
                       DropPendingReplay("t/x", digest, a)])
    assert not await admin.exists(key)
    assert await store.take_pending_replay("t/x", digest) is None
    assert await read_all(store, {"t/x": EVERYTHING}) == []


async def test_a_user_without_lrem_is_named_at_open(acl_user: Any, prefix: str) -> None:
    allowed = [c for c in REDIS_COMMANDS if c != "LREM"]
    name, password = await acl_user(*key_rules(prefix), *(f"+{c.lower()}" for c in allowed))
    with pytest.raises(StoreConfigError) as err:
        await RedisStore(store_cfg(prefix, username=name, password=password)).open()
    assert "may not run LREM" in str(err.value)


# ---------------------------------------------------------------------------
# poison values, checked before the first round trip
# ---------------------------------------------------------------------------


def poison_batch() -> tuple[list[WriteOp], list[tuple[int, str]], list[StoredMessage]]:
    """Good and bad ops mixed: (ops, the (index, reason) of every bad one, the messages stored)."""
    base = now_us()
    dup = guid(base + 6, 6)
    good = [
        smsg(guid(base, 0), "p/ts", b"max", ts=2**64 - 1),
        smsg(guid(base + 1, 1), "p/" + "x" * 298),  # a 300-byte topic
        smsg(guid(base + 2, 2), "p/" + "y" * 65533),  # 65,535 bytes, EMQX's longest
        smsg(guid(base + 3, 3), "p/\x00/😀/'; DROP TABLE mqtt_msg; --", b"\x00\xff", sender="c\x00😀'--"),
        smsg(guid(base + 4, 4), "p/big", os.urandom(16 << 20)),  # 16 MiB
        smsg(dup, "p/dup", b"first"),
        smsg(dup, "p/dup", b"second"),  # the same id twice in one batch: the later one stands
    ]
    bad: list[tuple[WriteOp, str]] = [
        (SaveMessage(smsg(guid(base + 10, 10), "p/q", qos=255)), "out_of_range"),
        (SaveMessage(smsg(guid(base + 11, 11), "p/t", ts=2**64)), "out_of_range"),
        (SaveMessage(smsg(guid(base + 12, 12), "p/t", ts=-1)), "out_of_range"),
        (SaveMessage(StoredMessage("F" * 100, "s", "p/t", 1, False, b"x", 0)), "invalid_id"),
        (SaveMessage(StoredMessage("00AB", "s", "p/t", 1, False, b"x", 0)), "invalid_id"),
        (SaveMessage(smsg(guid(base + 13, 13), "p/\udcff")), "invalid_value"),
        (SaveMessage(smsg(guid(base + 14, 14), "p/s", sender="\ud800")), "invalid_value"),
        (DeleteMessage("x" * 100, "p/t"), "invalid_id"),
        (RekeyMessage(guid(base, 0), "not-a-guid", "p/ts"), "invalid_id"),
        (DropPendingReplay("p/t", "\udcff", "A" * 32), "invalid_value"),
    ]
    ops: list[WriteOp] = []
    expected: list[tuple[int, str]] = []
    for i in range(max(len(good), len(bad))):
        if i < len(bad):
            expected.append((len(ops), bad[i][1]))
            ops.append(bad[i][0])
        if i < len(good):
            ops.append(SaveMessage(good[i]))
    return ops, expected, good[:-2] + good[-1:]


async def test_poison_ops_are_refused_by_index_before_anything_is_written(store: RedisStore,
                                                                          admin: aioredis.Redis,
                                                                          prefix: str) -> None:
    ops, expected, stored = poison_batch()
    with pytest.raises(WriteRejected) as err:
        await store.write(ops)
    assert (err.value.index, err.value.reason) == expected[0]
    assert err.value.retryable is False and "\n" not in str(err.value)
    assert await keys_of(admin, prefix) == []  # refused before the first round trip
    assert await write_setting_aside(store, ops) == expected
    topics = sorted({m.topic for m in stored})
    got = await read_all(store, dict.fromkeys(topics, EVERYTHING))
    assert sorted(map(as_stored, got)) == sorted(map(as_stored, stored))


# ---------------------------------------------------------------------------
# refusals by the server (WRONGTYPE): the op by its reply, nothing of it left
# ---------------------------------------------------------------------------


async def test_a_topic_spelled_like_a_message_id_is_refused_for_that_op_only(store: RedisStore,
                                                                             admin: aioredis.Redis,
                                                                             prefix: str) -> None:
    m0 = smsg(guid(now_us()), "w/t", b"zero")
    await store.write(save(m0))
    clash = msgid_to_b62(m0.msgid)  # as a topic, its key is m0's hash
    good1, bad, good2 = (smsg(guid(now_us() + i, i), t) for i, t in ((1, "w/a"), (2, clash), (3, "w/b")))
    ops: list[WriteOp] = list(save(good1, bad, good2))
    with pytest.raises(WriteRejected) as err:
        await store.write(ops)
    assert (err.value.reason, err.value.index) == ("wrong_type", 1)
    assert "WRONGTYPE" in err.value.detail and "\n" not in str(err.value)
    # nothing of the refused op is left, and the message whose key it met is untouched
    assert not await admin.exists(mkey(prefix, msgid_to_b62(bad.msgid)))
    assert clash.encode() not in await admin.zrange(f"{prefix}:msg~ox:topics", 0, -1)
    assert await admin.hget(mkey(prefix, clash), "payload") == b"zero"
    assert await write_setting_aside(store, ops) == [(1, "wrong_type")]
    got = await read_all(store, dict.fromkeys(["w/a", "w/b", "w/t"], EVERYTHING))
    assert [m.msgid for m in got] == [m0.msgid, good1.msgid, good2.msgid]
    # that topic holds no messages for a reader either (no failing replay)
    assert await store.latest_positions([clash]) == {}
    assert await read_all(store, {clash: EVERYTHING}) == []
    assert await store.count_messages([clash]) == {}


async def test_a_message_whose_key_is_taken_by_a_topic_is_refused(store: RedisStore, admin: aioredis.Redis,
                                                                  prefix: str) -> None:
    bad = smsg(guid(now_us(), 7), "w2/t")
    taken = msgid_to_b62(bad.msgid)
    holder = smsg(guid(now_us() + 1, 8), taken)  # a message on a topic spelled like bad's id
    await store.write(save(holder))
    good = smsg(guid(now_us() + 2, 9), "w2/t")
    ops: list[WriteOp] = list(save(good, bad))
    with pytest.raises(WriteRejected) as err:
        await store.write(ops)
    assert (err.value.reason, err.value.index) == ("wrong_type", 1)
    assert await admin.zscore(mkey(prefix, "w2/t"), taken) is None  # its index member was taken back
    assert [m.msgid for m in await read_all(store, {taken: EVERYTHING})] == [holder.msgid]
    assert await write_setting_aside(store, ops) == [(1, "wrong_type")]
    assert [m.msgid for m in await read_all(store, {"w2/t": EVERYTHING})] == [good.msgid]


async def test_a_rekey_onto_a_taken_key_moves_nothing(store: RedisStore) -> None:
    old = smsg(guid(now_us()), "w3/t", b"keep me")
    new_id = guid(now_us() + 1000, 1)
    holder = smsg(guid(now_us() + 5, 2), msgid_to_b62(new_id))
    await store.write(save(old, holder))
    before = await read_all(store, {"w3/t": EVERYTHING})
    with pytest.raises(WriteRejected) as err:
        await store.write([RekeyMessage(old.msgid, new_id, "w3/t")])
    assert (err.value.reason, err.value.index) == ("wrong_type", 0)
    assert await read_all(store, {"w3/t": EVERYTHING}) == before


async def test_a_key_of_the_service_changed_under_it_is_a_setup_error(store: RedisStore, admin: aioredis.Redis,
                                                                      prefix: str) -> None:
    await admin.set(f"{prefix}:msg~ox:topics", "not a sorted set")  # not one op's doing
    with pytest.raises(StoreConfigError) as err:
        await store.write(save(smsg(guid(now_us()), "cfg/t")))
    assert "WRONGTYPE" in str(err.value) and "\n" not in str(err.value)
    await admin.delete(f"{prefix}:msg~ox:topics")  # the operator repairs it: the retry passes
    m = smsg(guid(now_us()), "cfg/t")
    await store.write(save(m))
    assert await store.stored_topics("cfg/") == ["cfg/t"]


# ---------------------------------------------------------------------------
# subscriptions
# ---------------------------------------------------------------------------


async def test_subscription_values_that_cannot_be_stored_are_rejected(store: RedisStore, admin: aioredis.Redis,
                                                                      prefix: str) -> None:
    for args, reason in (((("c", "t", 3)), "out_of_range"), (("c\udcff", "t", 1), "invalid_value"),
                         (("c", "t/\ud800", 1), "invalid_value")):
        with pytest.raises(WriteRejected) as err:
            await store.save_subscription(*args)
        assert (err.value.reason, err.value.index) == (reason, None)
    await admin.set(f"{prefix}:sub:taken", "not a hash")
    with pytest.raises(WriteRejected) as err:
        await store.save_subscription("taken", "t", 1)
    assert err.value.reason == "wrong_type"
    # what Redis can hold is stored as it is
    odd = "c" * 100 + "\x00😀'; --"
    await store.save_subscription(odd, "a/\x00/😀", 2)
    assert [(s.topic, s.qos) for s in await store.subscriptions(odd)] == [("a/\x00/😀", 2)]
    # names that can never have been stored: found nowhere, nothing to delete
    assert await store.subscriptions("c\udcff") == []
    await store.delete_subscription("c\udcff", "t")


# ---------------------------------------------------------------------------
# transient failures and set-up problems (private servers)
# ---------------------------------------------------------------------------


async def opened_on(server: RedisSingle) -> RedisStore:
    store = RedisStore(RedisConfig(servers=(HostPort("127.0.0.1", server.port),), message_key_prefix="oxw:msg",
                                   subscription_key_prefix="oxw:sub"))
    await store.open()
    return store


async def assert_transient(store: RedisStore) -> None:
    with pytest.raises(StoreError) as err:
        await store.write(save(smsg(guid(now_us()), "tr/t")))
    assert type(err.value) is StoreError and err.value.retryable, err.value
    assert "\n" not in str(err.value)


async def test_a_stopped_server_is_a_transient_error(redis_factory: RedisTopologies) -> None:
    server = redis_factory.single()
    store = await opened_on(server)
    try:
        await store.write(save(smsg(guid(now_us()), "tr/t")))
        server._require().kill(signal.SIGKILL)
        await assert_transient(store)
    finally:
        await store.close()


async def test_a_hanging_server_is_a_transient_error(redis_factory: RedisTopologies,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("storage.redis.link.OP_TIMEOUT_S", 0.5)
    server = redis_factory.single()
    store = await opened_on(server)
    try:
        server._require().kill(signal.SIGSTOP)
        try:
            await assert_transient(store)
        finally:
            server._require().kill(signal.SIGCONT)
        m = smsg(guid(now_us()), "tr/t")
        await store.write(save(m))  # the same store carries on once the server answers again
        # (the write that timed out may have been applied too: the caller writes it again)
        assert m.msgid in [x.msgid for x in await read_all(store, {"tr/t": EVERYTHING})]
    finally:
        await store.close()


async def test_a_restore_s_first_read_on_a_hanging_server_fails_as_transient_and_then_works(
        redis_factory: RedisTopologies, monkeypatch: pytest.MonkeyPatch) -> None:
    # fresh_session_subscriptions is one pipeline (read the subscriptions, drop the
    # connection's marks): it must end with the link's deadline like every other call,
    # as an error the restore retries, and the same store must serve it afterwards
    monkeypatch.setattr("storage.redis.link.OP_TIMEOUT_S", 0.5)
    server = redis_factory.single()
    store = await opened_on(server)
    conn = "hung|node|127.0.0.1|1"
    try:
        await store.save_subscription("hung", "h/#", 1)
        assert await store.claim_replay(conn, {"h/a": 5.0}) == {"h/a": None}
        server._require().kill(signal.SIGSTOP)
        try:
            with pytest.raises(StoreError) as err:
                await asyncio.wait_for(store.fresh_session_subscriptions("hung", conn), 30)
            assert type(err.value) is StoreError and err.value.retryable, err.value
            assert "\n" not in str(err.value)
        finally:
            server._require().kill(signal.SIGCONT)
        assert await store.fresh_session_subscriptions("hung", conn) == [Subscription("h/#", 1)]
        assert await store.claim_replay(conn, {"h/a": 5.0}) == {"h/a": None}  # the marks were reset
    finally:
        await store.close()


@pytest.mark.parametrize("refusal", ["read-only replica", "out of memory"])
async def test_a_server_refusing_all_writes_is_a_transient_error(redis_factory: RedisTopologies,
                                                                 refusal: str) -> None:
    server = redis_factory.single()
    store = await opened_on(server)
    admin = server.admin_client()
    try:
        if refusal == "read-only replica":  # e.g. a master demoted by a failover
            admin.execute_command("REPLICAOF", "127.0.0.1", "1")
        else:
            admin.config_set("maxmemory", 1)
        await assert_transient(store)
        if refusal == "read-only replica":
            admin.execute_command("REPLICAOF", "NO", "ONE")
        else:
            admin.config_set("maxmemory", 0)
        await store.write(save(smsg(guid(now_us()), "tr/t")))
    finally:
        admin.close()
        await store.close()


async def test_a_permission_taken_away_at_write_time_is_a_setup_error(acl_user: Any, admin: aioredis.Redis,
                                                                      prefix: str) -> None:
    name, password = await acl_user(*key_rules(prefix), *(f"+{c.lower()}" for c in REDIS_COMMANDS))
    store = RedisStore(store_cfg(prefix, username=name, password=password))
    await store.open()
    try:
        await admin.execute_command("ACL", "SETUSER", name, "-zadd")
        with pytest.raises(StoreConfigError) as err:
            await store.write(save(smsg(guid(now_us()), "acl/t")))
        assert "\n" not in str(err.value) and password not in str(err.value)
        await admin.execute_command("ACL", "SETUSER", name, "+zadd")
        await store.write(save(smsg(guid(now_us()), "acl/t")))
    finally:
        await store.close()


async def test_an_index_member_whose_key_became_a_topic_is_dropped_not_failing_the_replay(
        store: RedisStore, admin: aioredis.Redis, prefix: str) -> None:
    gone, kept = smsg(guid(now_us(), 1), "w6/t"), smsg(guid(now_us() + 1, 2), "w6/t")
    await store.write(save(gone, kept))
    b62 = msgid_to_b62(gone.msgid)
    await admin.delete(mkey(prefix, b62))  # its hash went (expired), its index member stayed
    await store.write(save(smsg(guid(now_us() + 2, 3), b62)))  # a topic spelled like its id takes the key
    assert [m.msgid for m in await read_all(store, {"w6/t": EVERYTHING})] == [kept.msgid]
    assert await admin.zscore(mkey(prefix, "w6/t"), b62) is None  # dropped like any dangling member


async def test_wait_replicas_beyond_the_connected_replicas_is_said_at_open(
        prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    # the machine's Redis has no replica: every write would count as failed and wait in
    # the spool, so the operator hears of it at start-up, naming the field
    store = RedisStore(store_cfg(prefix, wait_replicas=1, wait_timeout_ms=50))
    await store.open()
    try:
        [line] = [r.getMessage() for r in caplog.records if getattr(r, "event", None) == "redis_replicas_short"]
        assert line.startswith("redis.wait_replicas: 1 replicas must confirm each write, but 0 answered")
        with pytest.raises(StoreError, match="only 0 of 1 replicas confirmed a write within 50 ms"):
            await store.write(save(smsg(guid(now_us()), "w7/t")))
    finally:
        await store.close()
