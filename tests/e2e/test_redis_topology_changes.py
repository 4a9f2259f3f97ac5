"""Redis changes under the service while publishers are busy: a sentinel failover
(the master is SIGKILLed), the only replica paused (writes wait in the spool for its WAIT) and a
cluster slot migration. Every message the service answered as stored must be in the
store afterwards."""

from __future__ import annotations

import asyncio
import signal

import pytest

from tests.e2e.backends import RedisBackend
from tests.e2e.harness import Harness

PUBLISHERS = 4


async def publish_load(h: Harness, stop: asyncio.Event, counts: list[int], progress: asyncio.Condition) -> None:
    async def one(k: int) -> None:
        pub = h.client(f"load{k}")
        await pub.connect()
        while not stop.is_set():
            await pub.publish(f"t/load/{k}", f"{k}:{counts[k]}".encode(), qos=1)
            counts[k] += 1
            async with progress:
                progress.notify_all()
        await pub.disconnect()

    await asyncio.gather(*(one(k) for k in range(PUBLISHERS)))


async def run_load_around(h: Harness, change: object, settle_messages: int = 200) -> int:
    stop = asyncio.Event()
    counts = [0] * PUBLISHERS
    progress = asyncio.Condition()
    load = asyncio.create_task(publish_load(h, stop, counts, progress))
    async with progress:
        await progress.wait_for(lambda: sum(counts) >= settle_messages)
    await change()  # type: ignore[operator]
    before = sum(counts)
    async with progress:
        await progress.wait_for(lambda: sum(counts) >= before + settle_messages)
    stop.set()
    await load
    await h.settle()
    return sum(counts)


async def test_sentinel_failover_under_load_keeps_every_stored_message(redis_factory) -> None:  # type: ignore[no-untyped-def]
    # two replicas: the promoted one still has a replica to confirm its writes (WAIT 1), as in
    # production; with one, every write after the failover would wait out wait_timeout
    sentinels = redis_factory.sentinel(replicas=2)
    backend = RedisBackend(sentinels, extra=", wait_replicas = 1, wait_timeout = 500ms")
    # every publish waits until its write is durable (on a replica too), so an answered
    # publish is a stored one; the failover takes seconds, hence the long deadlines
    h = Harness(backend, "v3", batch_size=50, publish_deadline="20s", request_timeout=30.0)
    await h.start()
    try:
        async def failover() -> None:
            old = await asyncio.to_thread(sentinels.kill_master)
            await sentinels.wait_failover(old=old)

        total = await run_load_around(h, failover)
        metrics = h.service.metrics
        for reason in ("store_slow", "spool_full"):
            assert metrics.sample("publish_deadline_answers_total", reason=reason) == 0
        assert metrics.sample("store_failures_total", operation="write") >= 1  # the service did see the master go
        assert await backend.count_messages() == total
    finally:
        await h.stop()


async def test_a_write_no_replica_confirms_is_kept_in_the_spool_until_one_does(  # type: ignore[no-untyped-def]
        redis_factory, caplog: pytest.LogCaptureFixture) -> None:
    # the only replica is paused (SIGSTOP, by PID): WAIT 1 gets 0 within wait_timeout, so
    # the write is on the master alone and a failover could lose it. It counts as failed:
    # the publish is answered from the local spool, which keeps it until a replica confirms
    sentinels = redis_factory.sentinel()  # one replica
    backend = RedisBackend(sentinels, extra=", wait_replicas = 1, wait_timeout = 100ms")
    h = Harness(backend, "v3")
    await h.start()
    try:
        master_port = (await asyncio.to_thread(sentinels.master_address))[1]
        [replica] = [n for n in sentinels.data_nodes if n.port != master_port]
        replica.kill(signal.SIGSTOP)
        try:
            pub = h.client("alone")
            await pub.connect()
            for i in range(3):
                await pub.publish("t/alone", f"m{i}".encode(), qos=1)
            metrics = h.service.metrics
            assert metrics.sample("publish_deadline_answers_total", reason="store_slow") == 3
            assert metrics.sample("spooled_total") >= 3
            short = [r.getMessage() for r in caplog.records if "replicas confirmed a write" in r.getMessage()]
            assert short and all("only 0 of 1 replicas confirmed a write within 100 ms" in m for m in short)
        finally:
            replica.kill(signal.SIGCONT)
        await h.settle()  # the drainer moves the spool into the store once the replica confirms
        assert h.service.metrics.sample("spool_pending") == 0
        assert h.service.metrics.sample("spool_drained_total") >= 3
        assert await backend.count_messages() == 3
    finally:
        await h.stop()


async def test_cluster_reshard_under_load_loses_nothing(redis_cluster) -> None:  # type: ignore[no-untyped-def]
    backend = RedisBackend(redis_cluster)
    h = Harness(backend, "v3", batch_size=50, publish_deadline="20s", request_timeout=30.0)
    await h.start()
    try:
        async def reshard() -> None:
            primaries = await asyncio.to_thread(redis_cluster.primaries)
            await redis_cluster.reshard(1500, primaries[0], primaries[1])

        total = await run_load_around(h, reshard)
        assert h.service.metrics.sample("publish_deadline_answers_total", reason="spool_full") == 0
        assert await backend.count_messages() == total
        sub = h.client("after-reshard")
        await sub.connect()
        await sub.subscribe("t/load/#", qos=1)
        await sub.wait_for_deliveries(total, timeout=60)
        assert len({d.payload for d in sub.deliveries}) == total
    finally:
        await h.stop()
