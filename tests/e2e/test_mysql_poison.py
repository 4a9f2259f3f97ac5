"""Issue 10 end to end on MySQL: publishes the store cannot hold, mixed concurrently with
good ones, through the service, with the default templates and with an
``insert_message_sql`` the store does not parse (``insert ... set``: only the server can
refuse an over-long topic there). Every good message is stored byte-exact, each bad one
is refused and counted (never counted as stored), and the writer never stalls."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiomysql
import pytest

from tests.e2e.backends import MYSQL, MysqlBackend
from tests.e2e.harness import Harness

INSERT_SET = ("insert into mqtt_msg set msgid = ${id}, sender = ${from}, topic = ${topic}, qos = ${qos}, "
              "retain = ${flags.retain}, payload = ${payload}, arrived = FROM_UNIXTIME(${timestamp}/1000)")


@pytest.fixture(params=["default", "insert-set"])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    extra = f'mysql.insert_message_sql = "{INSERT_SET}"' if request.param == "insert-set" else ""
    h = Harness(MysqlBackend(), "v3", batch_size=20, extra_hocon=extra)
    await h.start()
    try:
        yield h
    finally:
        await h.stop()
        assert h.emu is None or not h.emu.errors, h.emu.errors


async def stored_rows(backend: MysqlBackend) -> dict[str, bytes]:
    conn = await aiomysql.connect(**MYSQL, db=backend.database, autocommit=True)
    try:
        async with conn.cursor() as cur:
            await cur.execute("SELECT topic, payload FROM mqtt_msg")
            return {str(topic): bytes(payload) for topic, payload in await cur.fetchall()}
    finally:
        conn.close()


async def test_poison_publishes_mixed_with_good_ones(harness: Harness) -> None:
    h = harness
    metrics = h.service.metrics
    good = {f"t/good/{i}/\U0001f600'; --": b"\x00" + bytes([i]) * i for i in range(30)}  # MQTT topics hold no NUL
    bad = ["t/" + "x" * 298, "t/" + "y" * 4000, "t/" + "\u00e9" * 179]  # longer than varchar(180)
    publishers = [h.client(f"pub-{i}") for i in range(4)]
    for pub in publishers:
        await pub.connect()
    goods, bads = list(good.items()), list(bad)
    jobs = []
    for i in range(max(len(goods), len(bads))):
        pub = publishers[i % len(publishers)]
        if i < len(goods):
            jobs.append(pub.publish(goods[i][0], goods[i][1], qos=1))
        if i < len(bads):
            jobs.append(pub.publish(bads[i], b"refused", qos=1))
    await asyncio.gather(*jobs)
    after = {"t/after": b"durable"}
    await publishers[0].publish("t/after", b"durable", qos=1)
    await h.settle()
    assert await stored_rows(h.backend) == {**good, **after}  # type: ignore[arg-type]
    assert metrics.sample("writes_rejected_total", backend="mysql", reason="too_long") == len(bad)
    assert metrics.sample("messages_stored_total") == len(good) + 1
    assert metrics.sample("publish_deadline_answers_total", reason="store_slow") == 0
