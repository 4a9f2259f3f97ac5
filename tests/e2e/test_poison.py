"""Poison inputs mixed with good ones, concurrently, on every backend (issue 10, "How
it is tested"): over real gRPC (v3 and v2) the good publishes and every hostile input
arrive at once. Every good message is stored byte for byte (read back with the
database's plain client), every bad one is either rejected and counted with its
reason (``requests_rejected_total`` at the gate, ``writes_rejected_total`` by the
store) or stored verbatim, and the writer never stalls: no op ever goes to the spool
and a publish after the bad ones is answered as stored."""

from __future__ import annotations

import asyncio
import os
import random
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from exhook.metrics import PREFIX, Metrics
from tests.e2e.backends import BackendUnderTest, MysqlBackend, RedisBackend, SqliteBackend
from tests.e2e.harness import Harness
from tests.e2e.plain_reads import Row, store_key, stored_rows, stored_subscriptions
from tests.hook_calls import (
    is_ignore,
    message,
    new_id,
    publish_request,
    stub,
    subscribed_request,
)

MiB = 1024 * 1024
GOOD = 40
LONG_CLIENT = "L" * 100  # longer than MySQL's varchar(64) clientid column


class CustomTemplateMysql(MysqlBackend):
    """MySQL with an ``insert_message_sql`` of a shape the service does not parse (it
    runs the template as it is, once per message)."""

    def hocon(self, topics: list[str], message_ttl: int, batch_size: int) -> str:
        insert = ("insert into mqtt_msg set msgid = ${id}, sender = ${from}, topic = ${topic}, qos = ${qos}, "
                  "retain = ${flags.retain}, payload = ${payload}, arrived = FROM_UNIXTIME(${timestamp}/1000)")
        return super().hocon(topics, message_ttl, batch_size).rstrip("} ") + f', insert_message_sql = "{insert}" }}'


def make(name: str, tmp_path: Path) -> BackendUnderTest:
    if name == "sqlite":
        return SqliteBackend(tmp_path)
    if name == "mysql":
        return MysqlBackend()
    if name == "mysql-custom-insert":
        return CustomTemplateMysql()
    return RedisBackend()


@dataclass
class Case:
    """One publish and what must become of it: ``gate`` names the reason the gate
    rejects it with, ``store`` the reason the store refuses it with (None: stored
    verbatim)."""

    name: str
    msg: Any
    gate: str | None = None
    store: str | None = None


def poison_cases(version: str, backend: BackendUnderTest) -> list[Case]:
    def msg(topic: str, payload: bytes = b"poison", **kw: Any) -> Any:
        return message(version, kw.pop("msgid", new_id()), topic, payload, **kw)

    mysql = isinstance(backend, MysqlBackend)
    # the default schema's topic column is varchar(180); max_allowed_packet is 16 MiB
    too_long = "too_long" if mysql else None
    too_large = "too_large" if mysql else None
    dup = msg("t/dup", b"same id twice")
    return [
        Case("qos 255", msg("t/qos", qos=255), gate="bad_qos"),
        Case("timestamp 2**64-1", msg("t/ts", timestamp=2**64 - 1), gate="bad_timestamp"),
        Case("100-char msgid", msg("t/id", msgid="A" * 100), gate="bad_msgid"),
        Case("NUL in topic", msg("t/nul\x00x"), gate="bad_topic"),
        Case("NUL in clientid", msg("t/nulclient", sender="pub\x00x"), gate="bad_sender"),
        Case("16 MiB payload", msg("t/big/a", os.urandom(16 * MiB)), store=too_large),
        Case("16 MiB payload again", msg("t/big/b", b"\x00" * (16 * MiB)), store=too_large),
        Case("300-byte topic", msg("t/" + "x" * 298), store=too_long),
        Case("65,535-byte topic", msg("t/" + "y" * 65_533), store=too_long),
        Case("181-char topic", msg("t/" + "z" * 179), store=too_long),
        Case("emoji topic", msg("t/emoji/\U0001F600/ü")),
        Case("SQL text topic", msg("t/sql/'); DROP TABLE mqtt_msg; --")),
        Case("emoji clientid", msg("t/who", b"emoji sender", sender="c\U0001F600")),
        Case("SQL text clientid", msg("t/who", b"sql sender", sender="x'); DROP TABLE mqtt_sub; --")),
        Case("duplicate id", dup),
        Case("duplicate id again", dup),
    ]


def good_cases(version: str) -> list[Case]:
    rnd = random.Random(10)
    return [Case(f"good {i}", message(version, new_id(), f"t/good/{i % 7}",
                                      bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 3000)))))
            for i in range(GOOD)]


def labelled(metrics: Metrics, name: str) -> dict[tuple[str, ...], float]:
    """Every non-zero sample of a labelled counter: label values -> count."""
    out = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == PREFIX + name and sample.value:
                out[tuple(sample.labels.values())] = sample.value
    return out


def matches(row: Row, msg: Any, backend: BackendUnderTest) -> bool:
    return (row.key, row.sender, row.topic, row.qos, row.payload) == (
        store_key(backend, msg.id), getattr(msg, "from"), msg.topic, msg.qos, msg.payload)


@pytest.fixture
async def harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    backend_name, version = request.param
    # a deadline no healthy write of 16 MiB comes near: an answer at the deadline is a stall
    h = Harness(make(backend_name, tmp_path), version, batch_size=16, publish_deadline="5s")
    await h.start()
    try:
        yield h
    finally:
        await h.stop()
    assert h.emu is None or not h.emu.errors, h.emu.errors


async def long_clientid_gets_its_replay(h: Harness) -> list[bytes]:
    """A subscriber whose clientid no MySQL default column holds still gets what was
    stored for it (its subscription may not be stored)."""
    sub = h.client(LONG_CLIENT)
    await sub.connect()
    await sub.subscribe("w/long", qos=1)
    deliveries = await sub.wait_for_deliveries(3, timeout=20)
    return [d.payload for d in deliveries]


@pytest.mark.parametrize("harness", [(b, v) for b in ("sqlite", "mysql", "mysql-custom-insert", "redis")
                                     for v in ("v3", "v2")], indirect=True, ids=lambda p: "-".join(p))
async def test_poison_mixed_with_good_inputs_is_isolated_and_the_writer_never_stalls(harness: Harness) -> None:
    h, version = harness, harness.version
    backend, metrics = h.backend, h.service.metrics
    poison, good = poison_cases(version, backend), good_cases(version)

    pub = h.client("pub")  # stored before the long-clientid subscriber arrives
    await pub.connect()
    for i in range(3):
        await pub.publish("w/long", f"for the long clientid {i}".encode(), qos=1)

    cases = poison + good
    random.Random(1).shuffle(cases)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{h.grpc_port}") as channel:
        hooks = stub(channel, version)

        async def publish(case: Case) -> Any:
            return await hooks.OnMessagePublish(publish_request(version, case.msg), timeout=60)

        async def subscribe(clientid: str) -> grpc.StatusCode:
            try:
                await hooks.OnSessionSubscribed(subscribed_request(version, clientid, "s/poison"), timeout=60)
            except grpc.aio.AioRpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

        answers, sub_codes, replayed = await asyncio.gather(
            asyncio.gather(*(publish(c) for c in cases)),
            asyncio.gather(*(subscribe(c) for c in ("c\U0001F600", "x'); DROP TABLE mqtt_sub; --", "c\x00x"))),
            long_clientid_gets_its_replay(h))
        assert all(is_ignore(version, a) for a in answers)
        assert sub_codes == [grpc.StatusCode.OK, grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT]
        assert replayed == [f"for the long clientid {i}".encode() for i in range(3)]

        await asyncio.wait_for(h.settle(), 60)  # the writer has everything: it is not stuck behind a bad op
        stored_before = metrics.sample("messages_stored_total")
        probe = message(version, new_id(), "t/probe", b"after the poison")
        assert is_ignore(version, await hooks.OnMessagePublish(publish_request(version, probe), timeout=10))

    # the probe, and everything before it, was answered as stored: nothing waited for the spool
    assert metrics.sample("messages_stored_total") == stored_before + 1
    assert metrics.sample("publish_deadline_answers_total", reason="store_slow") == 0
    assert metrics.sample("publish_deadline_answers_total", reason="spool_full") == 0
    assert metrics.sample("spooled_total") == 0

    rows = await stored_rows(backend)
    by_key: dict[str, list[Row]] = {}
    for row in rows:
        by_key.setdefault(row.key, []).append(row)
    stored_cases = [c for c in cases if c.gate is None and c.store is None]
    for case in [*stored_cases, Case("probe", probe)]:
        found = by_key.get(store_key(backend, case.msg.id), [])
        assert found and all(matches(r, case.msg, backend) for r in found), case.name
    for case in cases:
        if case.gate is not None or case.store is not None:
            assert not by_key.get(store_key(backend, case.msg.id)), case.name
    # the long clientid's messages were replayed and acknowledged: gone; nothing else is there
    expected_keys = {store_key(backend, c.msg.id) for c in [*stored_cases, Case("probe", probe)]}
    assert set(by_key) == expected_keys

    gate = Counter(c.gate for c in cases if c.gate is not None)
    assert labelled(metrics, "requests_rejected_total") == {
        **{("message.publish", reason): n for reason, n in gate.items()},
        ("session.subscribed", "bad_clientid"): 1}
    refused = Counter(c.store for c in cases if c.gate is None and c.store is not None)
    if isinstance(backend, MysqlBackend):
        refused["too_long"] += 1  # the long clientid's subscription: varchar(64)
    assert labelled(metrics, "writes_rejected_total") == {(backend.name, r): n for r, n in refused.items()}
    # refusals are counted as such, not as failures of a healthy store
    assert metrics.sample("store_failures_total", operation="write") == 0
    assert metrics.sample("store_failures_total", operation="save_subscription") == 0
    # every answer "stored" is a message in the store (duplicates: two answers, one message)
    assert metrics.sample("messages_stored_total") == len(stored_cases) + 3 + 1

    assert await stored_subscriptions(backend, "c\U0001F600") == {"s/poison": 1}
    assert await stored_subscriptions(backend, "x'); DROP TABLE mqtt_sub; --") == {"s/poison": 1}
    long_subs = await stored_subscriptions(backend, LONG_CLIENT)
    assert long_subs == ({} if isinstance(backend, MysqlBackend) else {"w/long": 1})
