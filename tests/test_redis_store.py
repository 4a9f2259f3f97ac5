"""RedisStore against the real Redis at 127.0.0.1:6379.

Every test uses its own random key prefixes and deletes its keys afterwards. Most
tests run twice: once as the store runs on a single server, once with the store's
cluster-mode write phases forced on (the same single server: the phases and the
script-free topic clean-up are exercised; real clusters are in test_redis_modes.py).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import time
from typing import Any

import pytest
import redis.asyncio as aioredis

from exhook.config import HostPort, RedisConfig
from storage.base import TOMBSTONE_TTL_S, StoreConfigError, StoreError
from storage.base62 import b62_to_msgid, msgid_to_b62
from storage.model import (
    DeleteMessage,
    PendingReplay,
    RekeyMessage,
    SaveMessage,
    StoredMessage,
    Subscription,
    WriteOp,
)
from storage.redis import REDIS_COMMANDS, RedisStore
from tests.redis_store_support import (
    EVERYTHING,
    NODE,
    StoreFactory,
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


def _erl_zscore(raw: bytes) -> float:
    """emqx_omp_redis:parse_zscore/1: binary_to_float, else binary_to_integer (else crash)."""
    if re.fullmatch(rb"-?\d+\.\d+(e[+-]?\d+)?", raw):
        return float(raw)
    if re.fullmatch(rb"-?\d+", raw):
        return int(raw)
    raise AssertionError(f"the plugin cannot parse score {raw!r}")


async def plugin_fetch(admin: aioredis.Redis, prefix: str, topic: str, ttl: int = 7200) -> list[dict[str, Any]]:
    """What the plugin 2.0.0 does on session.subscribed: ZRANGE 0 -1 WITHSCORES, keep
    score > now - ttl, HGETALL each, parse the fields the way hash_to_message does."""
    # the reply as Redis sends it (redis-py would parse the scores): through a script
    flat = await admin.execute_command(
        "EVAL", "return redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')", 1, mkey(prefix, topic))
    deadline = time.time() * 1000 - ttl * 1000
    out = []
    for i in range(0, len(flat), 2):
        member, score = flat[i], _erl_zscore(flat[i + 1])
        if not score > deadline:
            continue
        h = await admin.hgetall(mkey(prefix, member))
        if not h:
            continue
        assert h[b"retain"] in (b"true", b"false")  # binary_to_bool crashes otherwise
        out.append({
            "id": b62_to_msgid(h[b"id"]), "member": member, "from": h[b"from"], "qos": int(h[b"qos"]),
            "topic": h[b"topic"], "payload": h[b"payload"], "ts": int(h[b"ts"]),
            "retain": h[b"retain"] == b"true", "score": score,
        })
    return out


# ---------------------------------------------------------------------------
# layout and order
# ---------------------------------------------------------------------------


async def test_plugin_reads_what_we_write(store: RedisStore, admin: aioredis.Redis, prefix: str) -> None:
    base = now_us()
    m1 = smsg(guid(base, 1), "t/1", b"\x00one\xff", sender="c1", qos=1, retain=True, ts=base // 1000)
    m2 = smsg(guid(base + 250, 2), "t/1", b"two", sender="c2", qos=2)
    await store.write(save(m1, m2))

    got = await plugin_fetch(admin, prefix, "t/1")
    assert [g["id"] for g in got] == [m1.msgid, m2.msgid]
    assert got[0] == {
        "id": m1.msgid, "member": msgid_to_b62(m1.msgid).encode(), "from": b"c1", "qos": 1,
        "topic": b"t/1", "payload": b"\x00one\xff", "ts": base // 1000, "retain": True,
        "score": got[0]["score"],
    }
    assert got[1]["qos"] == 2 and got[1]["retain"] is False
    # the score is the arrival time in ms (from the GUID's microseconds), a float
    assert got[0]["score"] == pytest.approx(base / 1000, abs=0.002)
    assert got[1]["score"] > got[0]["score"]
    # exactly the plugin's fields, the hash expires after message_ttl
    h = await admin.hgetall(mkey(prefix, msgid_to_b62(m1.msgid)))
    assert set(h) == {b"id", b"from", b"qos", b"topic", b"payload", b"ts", b"retain"}
    assert 7190 < await admin.ttl(mkey(prefix, msgid_to_b62(m1.msgid))) <= 7200
    assert await admin.ttl(mkey(prefix, "t/1")) == -1  # the zset has no TTL (as the plugin)
    # our own keys are outside the plugin's namespace (its cleanup test lists KEYS mqtt:msg:*)
    ours = [k async for k in admin.scan_iter(match=f"{prefix}:msg~ox:*")]
    assert ours == [f"{prefix}:msg~ox:topics".encode()]
    listed = {k async for k in admin.scan_iter(match=f"{prefix}:msg:*")}
    assert listed == {mkey(prefix, "t/1"), mkey(prefix, msgid_to_b62(m1.msgid)),
                      mkey(prefix, msgid_to_b62(m2.msgid))}


async def test_we_read_a_store_the_plugin_wrote(store: RedisStore, admin: aioredis.Redis, prefix: str) -> None:
    """The plugin's publish pipeline with plain commands (HMSET, ZADD float_to_binary(Now),
    EXPIRE, ZREMRANGEBYSCORE -inf Deadline) and its subscription hash."""
    topic = "plugin/t"
    now_ms = time.time() * 1000
    ids = [guid(now_us() + i, i) for i in range(5)]
    for i, msgid in enumerate(ids):
        b62 = msgid_to_b62(msgid)
        arrival = now_ms + i * 0.37
        await admin.execute_command(
            "HMSET", mkey(prefix, b62), "id", b62, "from", "erl", "qos", 1, "topic", topic,
            "payload", bytes([i, 0, 255]), "ts", int(now_ms), "retain", "false")
        await admin.execute_command("ZADD", mkey(prefix, topic), f"{arrival:.20e}", b62)  # float_to_binary
        await admin.execute_command("EXPIRE", mkey(prefix, b62), 7200)
        await admin.execute_command("ZREMRANGEBYSCORE", mkey(prefix, topic), "-inf", f"{arrival - 7200e3:.20e}")
    await admin.hset(f"{prefix}:sub:c1", mapping={topic: 1, "other/#": 2})

    got = await read_all(store, {topic: EVERYTHING})
    assert [m.msgid for m in got] == ids
    assert [m.payload for m in got] == [bytes([i, 0, 255]) for i in range(5)]
    assert all(m.sender == "erl" and m.qos == 1 and not m.retain and m.topic == topic for m in got)
    assert sorted(await store.subscriptions("c1"), key=lambda s: s.topic) == [
        Subscription("other/#", 2), Subscription(topic, 1)]
    positions = await store.latest_positions([topic])
    assert positions[topic] == got[-1].position

    # not in our topic index until rebuilt (the plugin does not maintain it)
    assert await store.stored_topics("plugin/") == []
    assert await store.rebuild_topic_index() == 1
    assert await store.stored_topics("plugin/") == [topic]

    # an ack of a plugin-written message deletes it the plugin's way
    await store.write([DeleteMessage(ids[0], topic)])
    assert not await admin.exists(mkey(prefix, msgid_to_b62(ids[0])))
    assert [g["id"] for g in await plugin_fetch(admin, prefix, topic)] == ids[1:]


async def test_order_within_one_millisecond(store: RedisStore) -> None:
    base = (now_us() // 1000) * 1000
    # 40 messages in one millisecond, GUIDs 20 us apart, written in shuffled batches
    ids = [guid(base + 20 * i + 1, i) for i in range(40)]
    shuffled = ids[20:] + ids[:20]
    await store.write(save(*(smsg(i, "ms/t") for i in shuffled[:25])))
    await store.write(save(*(smsg(i, "ms/t") for i in shuffled[25:])))
    for page_size in (1, 3, 7, 100):
        got = await read_all(store, {"ms/t": EVERYTHING}, page_size)
        assert [m.msgid for m in got] == ids
    positions = [m.position for m in got]
    assert positions == sorted(positions) and len(set(positions)) == 40


async def test_equal_scores_are_read_in_guid_order(store: RedisStore, admin: aioredis.Redis, prefix: str) -> None:
    us = now_us()
    # same microsecond: the GUIDs differ in sequence (and node) only; pick a window of
    # sequence numbers where the b62 ids (Redis' order for equal scores) are out of GUID order
    seq = next(s for s in range(65000) if msgid_to_b62(guid(us, s)) > msgid_to_b62(guid(us, s + 1)))
    ids = sorted({guid(us, s, node) for s in range(max(0, seq - 6), seq + 7) for node in (NODE, NODE + 1)})
    assert sorted(msgid_to_b62(i) for i in ids) != [msgid_to_b62(i) for i in ids]
    await store.write(save(*(smsg(i, "tie/a") for i in reversed(ids))))
    # around the tie group: earlier and later messages, so pages end inside the group
    before, after = guid(us - 1), guid(us + 1)
    await store.write(save(smsg(after, "tie/a"), smsg(before, "tie/a")))
    for page_size in (1, 2, 3, 4, 5, 8, 50):
        got = await read_all(store, {"tie/a": EVERYTHING}, page_size)
        assert [m.msgid for m in got] == [before, *ids, after], page_size


async def test_merge_across_topics_and_ranges(store: RedisStore) -> None:
    base = now_us()
    expected = []
    batch = []
    for i in range(90):
        topic = f"m/{i % 3}" if i % 10 else "m/x"
        m = smsg(guid(base + 10 * i, i), topic, str(i).encode())
        expected.append(m)
        batch.append(SaveMessage(m))
    await store.write(batch)
    topics = sorted({m.topic for m in expected})
    for page_size in (1, 4, 10, 1000):
        got = await read_all(store, dict.fromkeys(topics, EVERYTHING), page_size)
        assert [m.msgid for m in got] == [m.msgid for m in expected]
        assert [m.payload for m in got] == [m.payload for m in expected]
        assert all(a.position < b.position for a, b in itertools.pairwise(got))

    got = await read_all(store, dict.fromkeys(topics, EVERYTHING))
    highs = await store.latest_positions([*topics, "m/none"])
    assert set(highs) == set(topics)
    for t in topics:
        assert highs[t] == max(m.position for m in got if m.topic == t)
    # ranges: low exclusive, high inclusive, per topic
    p = {m.msgid: m.position for m in got}
    m0 = [m for m in expected if m.topic == "m/0"]
    m1 = [m for m in expected if m.topic == "m/1"]
    ranges = {"m/0": (p[m0[2].msgid], p[m0[5].msgid]), "m/1": (None, p[m1[1].msgid]), "m/none": (None, 1e20)}
    got = await read_all(store, ranges, 2)
    want = sorted(m0[3:6] + m1[:2], key=lambda m: p[m.msgid])
    assert [m.msgid for m in got] == [m.msgid for m in want]
    assert await read_all(store, {"m/0": (p[m0[5].msgid], p[m0[5].msgid])}) == []


async def test_binary_payloads(store: RedisStore, admin: aioredis.Redis, prefix: str) -> None:
    base = now_us()
    payloads = [b"", b"\x00", b"\x00\x00\x00", b"\xff\xfe\x80\xc3\x28", bytes(range(256)), os.urandom(1 << 20)]
    msgs = [smsg(guid(base + i), "bin/t", p) for i, p in enumerate(payloads)]
    await store.write(save(*msgs))
    got = await read_all(store, {"bin/t": EVERYTHING}, 2)
    assert [m.payload for m in got] == payloads
    for m in msgs:
        assert await admin.hget(mkey(prefix, msgid_to_b62(m.msgid)), "payload") == m.payload


async def test_large_read_is_paged_in_order(store: RedisStore) -> None:
    base = now_us() - 5_000_000
    n = 20_000
    ids = [guid(base + i * 3 // 2, i) for i in range(n)]  # 2 of 3 pairs share a microsecond
    for start in range(0, n, 1000):
        await store.write(save(*(smsg(i, f"big/{j % 2}") for j, i in enumerate(ids[start:start + 1000], start))))
    seen = 0
    last: tuple[float, str] | None = None
    pages = 0
    async for page in store.read_messages({"big/0": EVERYTHING, "big/1": EVERYTHING}, 500):
        pages += 1
        for m in page:
            key = (m.position, m.msgid)
            assert last is None or key > last
            last = key
            assert m.msgid == ids[seen]
            seen += 1
    assert seen == n and pages == n // 500


# ---------------------------------------------------------------------------
# wildcard discovery and clean-up
# ---------------------------------------------------------------------------


async def test_stored_topics(store: RedisStore) -> None:
    base = now_us()
    topics = ["a/b", "a/c/d", "a", "ab/x", "b/a", "a/ü/€"]
    await store.write(save(*(smsg(guid(base + i), t) for i, t in enumerate(topics))))
    assert sorted(await store.stored_topics("a/")) == ["a/b", "a/c/d", "a/ü/€"]
    assert sorted(await store.stored_topics("a")) == ["a", "a/b", "a/c/d", "a/ü/€", "ab/x"]
    assert sorted(await store.stored_topics("")) == sorted(topics)
    assert await store.stored_topics("a/ü") == ["a/ü/€"]
    assert await store.stored_topics("zz") == []


async def test_topic_leaves_index_when_empty(store: RedisStore, admin: aioredis.Redis, prefix: str) -> None:
    m1, m2 = smsg(guid(now_us()), "gone/1"), smsg(guid(now_us() + 1), "gone/2")
    await store.write(save(m1, m2))
    await store.write([DeleteMessage(m1.msgid, "gone/1")])
    assert not await admin.exists(mkey(prefix, "gone/1"))
    assert await store.stored_topics("gone/") == ["gone/2"]
    assert await admin.zrange(f"{prefix}:msg~ox:topics", 0, -1) == [b"gone/2"]
    # a topic with messages is never dropped by a clean-up
    await store._janitor.cleanup_topics([b"gone/2"])
    assert await admin.zrange(f"{prefix}:msg~ox:topics", 0, -1) == [b"gone/2"]
    # and comes back with its next message
    await store.write(save(smsg(guid(now_us() + 5), "gone/1")))
    assert sorted(await store.stored_topics("gone/")) == ["gone/1", "gone/2"]


async def test_cleanup_racing_a_publish_keeps_the_topic(store: RedisStore, admin: aioredis.Redis,
                                                        prefix: str) -> None:
    """A publish lands between the clean-up's emptiness check / removal and its end."""
    topic = "race/t"
    m = smsg(guid(now_us()), topic)
    await store.write(save(m))
    await store.write([DeleteMessage(m.msgid, topic)])
    newer = smsg(guid(now_us() + 10), topic)
    injected = False
    real_run, real_one = store._link.run, store._link.one

    async def publish_once() -> None:
        nonlocal injected
        if not injected:
            injected = True
            await store.write(save(newer))

    async def run(cmds: Any, what: str, **kw: Any) -> list[Any]:
        res = await real_run(cmds, what, **kw)
        if what == "topic clean-up":  # after the emptiness check (cluster) / the atomic script (single)
            await publish_once()
        return res

    async def one(cmd: Any, what: str) -> Any:
        res = await real_one(cmd, what)
        if what == "topic clean-up" and cmd[0] == "ZREM":  # right after the removal (cluster)
            await publish_once()
        return res

    store._link.run, store._link.one = run, one  # type: ignore[method-assign]
    try:
        await store._janitor.cleanup_topics([topic.encode()])
    finally:
        store._link.run, store._link.one = real_run, real_one  # type: ignore[method-assign]
    assert injected
    assert await admin.zrange(f"{prefix}:msg~ox:topics", 0, -1) == [topic.encode()]
    assert await store.stored_topics("race/") == [topic]


# ---------------------------------------------------------------------------
# acks, re-keys, tombstones
# ---------------------------------------------------------------------------


async def test_ack_deletes(store: RedisStore, admin: aioredis.Redis, prefix: str) -> None:
    m1, m2 = smsg(guid(now_us()), "ack/t"), smsg(guid(now_us() + 1), "ack/t")
    await store.write(save(m1, m2))
    await store.write([DeleteMessage(m1.msgid, "ack/t")])
    await store.write([DeleteMessage(m1.msgid, "ack/t")])  # idempotent
    assert [m.msgid for m in await read_all(store, {"ack/t": EVERYTHING})] == [m2.msgid]
    assert not await admin.exists(mkey(prefix, msgid_to_b62(m1.msgid)))
    assert not await admin.exists(f"{prefix}:msg~ox:tomb:{msgid_to_b62(m1.msgid)}")  # not a replay ack
    # save and ack in one batch (either order of arrival in the batch keeps the op order)
    m3 = smsg(guid(now_us() + 2), "ack/t")
    await store.write([SaveMessage(m3), DeleteMessage(m3.msgid, "ack/t")])
    assert [m.msgid for m in await read_all(store, {"ack/t": EVERYTHING})] == [m2.msgid]


async def test_rekey_keeps_position_and_ttl(make_store: StoreFactory, admin: aioredis.Redis, prefix: str) -> None:
    store = await make_store(ttl=300)
    old = smsg(guid(now_us()), "rk/t", b"payload\x00", sender="orig", retain=True)
    other = smsg(guid(now_us() + 7), "rk/t")
    await store.write(save(old, other))
    before = await read_all(store, {"rk/t": EVERYTHING})
    await admin.pexpire(mkey(prefix, msgid_to_b62(old.msgid)), 123_000)
    new_id = guid(now_us() + 1_000_000, 3, node=0xBEEF)
    await store.write([RekeyMessage(old.msgid, new_id, "rk/t")])
    after = await read_all(store, {"rk/t": EVERYTHING})
    assert [m.msgid for m in after] == [new_id, other.msgid]
    assert after[0].position == before[0].position
    assert (after[0].payload, after[0].sender, after[0].retain) == (b"payload\x00", "orig", True)
    new_key = mkey(prefix, msgid_to_b62(new_id))
    assert 110_000 < await admin.pttl(new_key) <= 123_000
    assert await admin.hget(new_key, "id") == msgid_to_b62(new_id).encode()
    assert not await admin.exists(mkey(prefix, msgid_to_b62(old.msgid)))
    # retried batch: no change
    await store.write([RekeyMessage(old.msgid, new_id, "rk/t")])
    assert [m.msgid for m in await read_all(store, {"rk/t": EVERYTHING})] == [new_id, other.msgid]
    # the subscriber's ack of the new id deletes it
    await store.write([DeleteMessage(new_id, "rk/t", replay_ack=True)])
    assert [m.msgid for m in await read_all(store, {"rk/t": EVERYTHING})] == [other.msgid]
    # a re-key of something gone is a no-op
    await store.write([RekeyMessage(guid(1), guid(2), "rk/t")])
    assert [m.msgid for m in await read_all(store, {"rk/t": EVERYTHING})] == [other.msgid]


async def test_ack_before_rekey_tombstone(store: RedisStore, admin: aioredis.Redis, prefix: str) -> None:
    """The replay's ack (new id) arrives before the re-key was written: the re-key sees
    the tombstone and deletes the moved copy."""
    old = smsg(guid(now_us()), "tb/t")
    keep = smsg(guid(now_us() + 5), "tb/t")
    await store.write(save(old, keep))
    new_id = guid(now_us() + 100, 1)
    await store.write([DeleteMessage(new_id, "tb/t", replay_ack=True)])
    tomb = f"{prefix}:msg~ox:tomb:{msgid_to_b62(new_id)}"
    assert TOMBSTONE_TTL_S - 5 < await admin.ttl(tomb) <= TOMBSTONE_TTL_S
    await store.write([RekeyMessage(old.msgid, new_id, "tb/t")])
    assert [m.msgid for m in await read_all(store, {"tb/t": EVERYTHING})] == [keep.msgid]
    for msgid in (old.msgid, new_id):
        assert not await admin.exists(mkey(prefix, msgid_to_b62(msgid)))


async def test_rekey_then_ack(store: RedisStore, admin: aioredis.Redis, prefix: str) -> None:
    old = smsg(guid(now_us()), "tb2/t")
    await store.write(save(old))
    new_id = guid(now_us() + 100, 1)
    await store.write([RekeyMessage(old.msgid, new_id, "tb2/t")])
    await store.write([DeleteMessage(new_id, "tb2/t", replay_ack=True)])
    assert await read_all(store, {"tb2/t": EVERYTHING}) == []
    assert await admin.zcard(mkey(prefix, "tb2/t")) == 0


@pytest.mark.parametrize("ack_first", [True, False])
async def test_rekey_and_ack_in_one_batch(store: RedisStore, admin: aioredis.Redis, prefix: str,
                                          ack_first: bool) -> None:
    old = smsg(guid(now_us()), "tb3/t")
    await store.write(save(old))
    new_id = guid(now_us() + 100, 1)
    ops: list[Any] = [RekeyMessage(old.msgid, new_id, "tb3/t"), DeleteMessage(new_id, "tb3/t", replay_ack=True)]
    await store.write(ops[::-1] if ack_first else ops)
    await store.write(ops[::-1] if ack_first else ops)  # a retried batch
    assert await read_all(store, {"tb3/t": EVERYTHING}) == []
    assert [k async for k in admin.scan_iter(match=f"{prefix}:msg:*")] == []


async def test_concurrent_rekey_and_ack_always_delete(make_store: StoreFactory, admin: aioredis.Redis,
                                                      prefix: str) -> None:
    """Two service instances: one writes the re-key, the other the replay's ack, racing."""
    a, b = await make_store(), await make_store()
    for i in range(30):
        old = smsg(guid(now_us(), i), "tb4/t")
        await a.write(save(old))
        new_id = guid(now_us() + 1000, i, node=0xABC)
        await asyncio.gather(a.write([RekeyMessage(old.msgid, new_id, "tb4/t")]),
                             b.write([DeleteMessage(new_id, "tb4/t", replay_ack=True)]))
    assert await read_all(a, {"tb4/t": EVERYTHING}) == []
    assert [k async for k in admin.scan_iter(match=f"{prefix}:msg:*")] == []


# ---------------------------------------------------------------------------
# replay bookkeeping
# ---------------------------------------------------------------------------


async def test_claim_replay(store: RedisStore, admin: aioredis.Redis, prefix: str) -> None:
    conn = "client-1@node1:10.0.0.1:5555"
    assert await store.claim_replay(conn, {}) == {}
    assert await store.claim_replay(conn, {"a": 10.5, "b/ü": 3.0}) == {"a": None, "b/ü": None}
    assert await store.claim_replay(conn, {"a": 12.25}) == {"a": 10.5}
    assert await store.claim_replay(conn, {"a": 11.0, "c": 1.0}) == {"a": 12.25, "c": None}  # never lowered
    assert await store.claim_replay(conn, {"a": 12.25}) == {"a": 12.25}
    precise = 1795551664342.1992
    await store.claim_replay(conn, {"p": precise})
    assert await store.claim_replay(conn, {"p": precise}) == {"p": precise}
    key = f"{prefix}:msg~ox:mark:{conn}"
    assert 24 * 3600 - 5 < await admin.ttl(key) <= 24 * 3600
    assert await store.claim_replay("other", {"a": 1.0}) == {"a": None}
    await store.reset_replay_marks(conn)
    assert await store.claim_replay(conn, {"a": 1.0}) == {"a": None}
    await store.save_subscription("fresh", "a/#", 2)
    assert await store.fresh_session_subscriptions("fresh", conn) == [Subscription("a/#", 2)]
    assert not await admin.exists(key)  # the marks are forgotten, in the same round trip
    assert await store.claim_replay(conn, {"a": 1.0}) == {"a": None}
    assert await store.fresh_session_subscriptions("nobody", conn) == []


async def test_concurrent_claims_replay_once(make_store: StoreFactory) -> None:
    stores = [await make_store() for _ in range(3)]
    highs = {"t/1": 100.0, "t/2": 200.5}
    results = await asyncio.gather(*(stores[i % 3].claim_replay("conn", highs) for i in range(30)))
    firsts = [r for r in results if r == {"t/1": None, "t/2": None}]
    assert len(firsts) == 1
    assert all(r == highs for r in results if r is not firsts[0])
    # racing claims with growing highs: every range (prev, high] is handed out at most once
    ranges = await asyncio.gather(*(stores[i % 3].claim_replay("conn2", {"t": float(i)}) for i in range(1, 40)))
    covered: list[tuple[float, float]] = []
    for i, prev in enumerate(ranges, 1):
        low = prev["t"] or 0.0
        if low < i:
            covered.append((low, float(i)))
    covered.sort()
    for (_, h1), (l2, _) in itertools.pairwise(covered):
        assert h1 <= l2  # no overlap


async def test_pending_replays(store: RedisStore, admin: aioredis.Redis, prefix: str) -> None:
    digest = "ab" * 32
    await store.register_pending_replays([])
    await store.register_pending_replays([
        PendingReplay("t/x", digest, "A" * 32), PendingReplay("t/x", digest, "B" * 32),
        PendingReplay("t/y", digest, "C" * 32),
    ])
    key = f"{prefix}:msg~ox:pend:{digest}:t/x"
    assert 590 < await admin.ttl(key) <= 600
    assert await store.take_pending_replay("t/x", digest) == "A" * 32
    assert await store.take_pending_replay("t/x", "cd" * 32) is None
    assert await store.take_pending_replay("t/x", digest) == "B" * 32
    assert await store.take_pending_replay("t/x", digest) is None
    # concurrent takes never hand out one registration twice
    await store.register_pending_replays([PendingReplay("t/z", digest, f"{i:032X}") for i in range(20)])
    got = await asyncio.gather(*(store.take_pending_replay("t/z", digest) for _ in range(25)))
    taken = [g for g in got if g is not None]
    assert sorted(taken) == [f"{i:032X}" for i in range(20)]


async def test_subscriptions(store: RedisStore, admin: aioredis.Redis, prefix: str) -> None:
    await store.save_subscription("c/1", "a/+", 1)
    await store.save_subscription("c/1", "$share/g/b", 2)
    await store.save_subscription("c/1", "a/+", 2)
    assert sorted(await store.subscriptions("c/1"), key=lambda s: s.topic) == [
        Subscription("$share/g/b", 2), Subscription("a/+", 2)]
    assert await admin.hgetall(f"{prefix}:sub:c/1") == {b"a/+": b"2", b"$share/g/b": b"2"}
    await store.delete_subscription("c/1", "a/+")
    await store.delete_subscription("c/1", "nope")
    assert await store.subscriptions("c/1") == [Subscription("$share/g/b", 2)]
    assert await store.subscriptions("nobody") == []


# ---------------------------------------------------------------------------
# expiry
# ---------------------------------------------------------------------------


async def test_ttl_expiry_and_index_cleanup(make_store: StoreFactory, admin: aioredis.Redis, prefix: str) -> None:
    store = await make_store(ttl=1)
    m = smsg(guid(now_us()), "exp/t")
    await store.write(save(m))
    assert [x.msgid for x in await read_all(store, {"exp/t": EVERYTHING})] == [m.msgid]
    await asyncio.sleep(2.1)
    assert not await admin.exists(mkey(prefix, msgid_to_b62(m.msgid)))  # the hash expired by itself
    assert await admin.zcard(mkey(prefix, "exp/t")) == 1  # the member lingers (as with the plugin)
    assert await read_all(store, {"exp/t": EVERYTHING}) == []
    assert await store.latest_positions(["exp/t"]) == {}
    assert await store.stored_topics("exp/") == []  # trims, then drops the topic
    assert not await admin.exists(mkey(prefix, "exp/t"))
    assert await admin.zcard(f"{prefix}:msg~ox:topics") == 0


async def test_expired_members_are_trimmed_on_publish_and_purge(make_store: StoreFactory,
                                                                admin: aioredis.Redis, prefix: str) -> None:
    store = await make_store(ttl=60)
    old = [smsg(guid(now_us() - 120_000_000 + i), f"pg/{i % 2}") for i in range(6)]  # 2 minutes old
    await store.write(save(*old))  # trimmed by the same publish's ZREMRANGEBYSCORE
    assert await admin.zcard(mkey(prefix, "pg/0")) == 0
    # members left behind (e.g. written by an instance whose clock was behind) go with purge_expired
    for m in old:
        await admin.zadd(mkey(prefix, m.topic), {msgid_to_b62(m.msgid): int(m.msgid[:16], 16) / 1000})
    await admin.zadd(f"{prefix}:msg~ox:topics", {"pg/0": 0, "pg/1": 0})
    live = smsg(guid(now_us()), "pg/live")
    await store.write(save(live))
    assert await store.purge_expired(1000) == 6
    assert await admin.zrange(f"{prefix}:msg~ox:topics", 0, -1) == [b"pg/live"]
    assert await store.purge_expired(1000) == 0


async def test_dangling_members_are_skipped_and_removed(store: RedisStore, admin: aioredis.Redis,
                                                       prefix: str) -> None:
    a, b, c = (smsg(guid(now_us() + i), "dg/t") for i in range(3))
    await store.write(save(a, b, c))
    await admin.delete(mkey(prefix, msgid_to_b62(b.msgid)))
    assert [m.msgid for m in await read_all(store, {"dg/t": EVERYTHING})] == [a.msgid, c.msgid]
    assert await admin.zscore(mkey(prefix, "dg/t"), msgid_to_b62(b.msgid)) is None


async def test_message_ttl_zero_keeps_until_acked(make_store: StoreFactory, admin: aioredis.Redis,
                                                  prefix: str) -> None:
    store = await make_store(ttl=0)
    old = smsg(guid(now_us() - 3_600_000_000), "k/t")  # an hour old
    new = smsg(guid(now_us()), "k/t")
    await store.write(save(old, new))
    assert await admin.ttl(mkey(prefix, msgid_to_b62(old.msgid))) == -1
    assert [m.msgid for m in await read_all(store, {"k/t": EVERYTHING})] == [old.msgid, new.msgid]
    assert await store.stored_topics("k/") == ["k/t"]
    assert await store.purge_expired(100) == 0
    rekeyed = guid(now_us() + 10, 5)
    await store.write([RekeyMessage(old.msgid, rekeyed, "k/t")])
    assert await admin.ttl(mkey(prefix, msgid_to_b62(rekeyed))) == -1
    await store.write([DeleteMessage(rekeyed, "k/t"), DeleteMessage(new.msgid, "k/t")])
    assert await read_all(store, {"k/t": EVERYTHING}) == []


# ---------------------------------------------------------------------------
# open(): connectivity, credentials, ACL
# ---------------------------------------------------------------------------


async def test_acl_user_with_the_documented_commands_works(acl_user: Any, prefix: str) -> None:
    name, password = await acl_user(*key_rules(prefix), *(f"+{c.lower()}" for c in REDIS_COMMANDS))
    store = RedisStore(store_cfg(prefix, username=name, password=password))
    await store.open()
    try:
        m = smsg(guid(now_us()), "acl/t")
        await store.write(save(m))
        await store.write([RekeyMessage(m.msgid, guid(now_us() + 1, 1), "acl/t")])
        assert len(await read_all(store, {"acl/t": EVERYTHING})) == 1
        assert await store.stored_topics("acl/") == ["acl/t"]
        assert await store.claim_replay("c", {"acl/t": 1.0}) == {"acl/t": None}
        await store.register_pending_replays([PendingReplay("acl/t", "d", "A" * 32)])
        assert await store.take_pending_replay("acl/t", "d") == "A" * 32
        await store.save_subscription("c", "acl/t", 1)
        assert await store.subscriptions("c") == [Subscription("acl/t", 1)]
        await store.ping()
    finally:
        await store.close()


async def test_acl_user_missing_commands_is_named(acl_user: Any, prefix: str) -> None:
    allowed = [c for c in REDIS_COMMANDS if c not in ("RPUSH", "EVAL", "PTTL")]
    name, password = await acl_user(*key_rules(prefix), *(f"+{c.lower()}" for c in allowed))
    store = RedisStore(store_cfg(prefix, username=name, password=password))
    with pytest.raises(StoreConfigError) as err:
        await store.open()
    text = str(err.value)
    assert "\n" not in text and password not in text
    for command in ("RPUSH", "EVAL", "PTTL"):
        assert command in text
    assert "HSET" not in text.split("may not run", 1)[1]


async def test_acl_user_missing_key_pattern_is_named(acl_user: Any, prefix: str) -> None:
    name, password = await acl_user(f"~{prefix}:msg:*", f"~{prefix}:sub:*",
                                     *(f"+{c.lower()}" for c in REDIS_COMMANDS))
    with pytest.raises(StoreConfigError) as err:
        await RedisStore(store_cfg(prefix, username=name, password=password)).open()
    assert f"{prefix}:msg~ox:*" in str(err.value)


async def test_acl_user_missing_a_script_command_is_named(acl_user: Any, prefix: str) -> None:
    allowed = [c for c in REDIS_COMMANDS if c != "HGET"]
    name, password = await acl_user(*key_rules(prefix), *(f"+{c.lower()}" for c in allowed))
    with pytest.raises(StoreConfigError) as err:
        await RedisStore(store_cfg(prefix, username=name, password=password)).open()
    assert "HGET" in str(err.value)


async def test_bad_password_is_a_config_error(acl_user: Any, prefix: str) -> None:
    name, password = await acl_user("~*", "+@all")
    with pytest.raises(StoreConfigError) as err:
        await RedisStore(store_cfg(prefix, username=name, password="wrong-" + password)).open()
    assert "authentication" in str(err.value) and password not in str(err.value)


async def test_unreachable_is_a_store_error(prefix: str) -> None:
    cfg = RedisConfig(servers=(HostPort("127.0.0.1", 1),), message_key_prefix=f"{prefix}:msg",
                      subscription_key_prefix=f"{prefix}:sub")
    with pytest.raises(StoreError) as err:
        await RedisStore(cfg).open()
    assert not isinstance(err.value, StoreConfigError)


async def test_runtime_failure_is_a_store_error(store: RedisStore) -> None:
    await store.close()
    with pytest.raises(StoreError):
        await store.ping()


# ---------------------------------------------------------------------------
# write path cost
# ---------------------------------------------------------------------------


async def test_a_batch_of_saves_is_one_round_trip(make_store: StoreFactory) -> None:
    store = await make_store()
    calls: list[str] = []
    real = store._link.run

    async def counting(cmds: Any, what: str, **kw: Any) -> list[Any]:
        calls.append(what)
        return await real(cmds, what, **kw)

    store._link.run = counting  # type: ignore[method-assign]
    base = now_us()
    await store.write(save(*(smsg(guid(base + i), f"rt/{i % 5}") for i in range(100))))
    await store.write([DeleteMessage(guid(base + i), f"rt/{i % 5}", replay_ack=True) for i in range(50)])
    expected = 6 if store._link.cluster else 2  # cluster: hashes, indexes, topics per batch
    assert len(calls) == expected, calls


async def test_an_invalid_message_id_does_not_block_the_batch(store: RedisStore) -> None:
    good = smsg(guid(now_us()), "inv/t")
    bad = StoredMessage(msgid="not-a-guid", sender="s", topic="inv/t", qos=1, retain=False, payload=b"x",
                        timestamp=0)
    ops: list[WriteOp] = [SaveMessage(bad), SaveMessage(good), DeleteMessage("zz", "inv/t"),
                          RekeyMessage("zz", good.msgid, "inv/t")]
    rejected = await write_setting_aside(store, ops)
    assert rejected == [(0, "invalid_id"), (2, "invalid_id"), (3, "invalid_id")]
    assert [m.msgid for m in await read_all(store, {"inv/t": EVERYTHING})] == [good.msgid]


async def test_more_concurrent_calls_than_pool_size(make_store: StoreFactory) -> None:
    store = await make_store(pool_size=2)
    base = now_us()
    await store.write(save(*(smsg(guid(base + i), f"pool/{i % 4}") for i in range(40))))

    async def reader(i: int) -> int:
        if i % 3 == 0:
            await store.claim_replay(f"c{i}", {"pool/0": 1.0})
        got = await read_all(store, {f"pool/{i % 4}": EVERYTHING}, 3)
        return len(got)

    counts = await asyncio.gather(*(reader(i) for i in range(60)))
    assert counts == [10] * 60
