"""The replay phase: N messages stored on one topic, then a new subscriber; the service
replays them through the REST stand-in (``bench/standin.py``: ``publish/bulk`` = one
sequential ``OnMessagePublish`` per item, like EMQX). And its ceiling: the same
``publish/bulk`` path with the no-op server behind it.

Both speak the protocol of the run: on v3 the service recognises its replays by a user
property; on v2 (no properties in the hook) by the pending-replay registry in the store.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from pathlib import Path

import grpc

from bench.common import (
    CHANNEL_OPTIONS,
    HOST,
    GuidGen,
    Latency,
    client_info,
    message,
    payload_bytes,
    proto,
    route,
)
from bench.profile import Profiler, summarize
from bench.results import Ceiling, ReplayResult
from bench.service import Backend, ServiceProc, wait_drain, wait_stored
from bench.standin import Delivery, StandIn
from bench.wire import WireTimer

PUBLISHERS = 16


class Acker:
    """The subscriber's PUBACKs during a replay: EMQX calls ``message.acked`` in the
    subscriber's process as each delivery is acknowledged, one after the other, while
    the replay goes on. So each delivered message is acked as it is delivered, one call
    at a time, over the channel the broker routes the subscriber's hooks to."""

    def __init__(self, channel: grpc.aio.Channel, protocol: str, subscriber: str) -> None:
        self._p = proto(protocol)
        self._call = channel.unary_unary(self._p.path("OnMessageAcked"), None, None)
        self._info = client_info(self._p, subscriber)
        self._queue: asyncio.Queue[Delivery] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.acked = self.failed = 0

    def start(self, standin: StandIn) -> None:
        standin.on_delivery = self._queue.put_nowait
        self._task = asyncio.create_task(self._run())

    async def stop(self, standin: StandIn, timeout: float) -> None:
        """Ack what is still queued (at most ``timeout`` s), then stop."""
        standin.on_delivery = None
        try:
            await asyncio.wait_for(self._queue.join(), timeout)
        except TimeoutError:
            say(f"acks still queued after {timeout:.0f} s: {self._queue.qsize():,}")
        finally:
            await self.cancel()

    async def cancel(self) -> None:
        """Stop at once (also a replay that failed)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        p = self._p
        while True:
            d = await self._queue.get()
            try:
                msg = message(p, "http_api", d.topic, d.payload, msgid=d.msgid)
                await self._call(p.pb.MessageAckedRequest(clientinfo=self._info, message=msg,
                                                          meta=p.meta).SerializeToString(), timeout=30)
                self.acked += 1
            except grpc.aio.AioRpcError as exc:  # counted and shown; the next acks still go
                self.failed += 1
                if self.failed == 1:
                    say(f"an ack failed: {exc.code().name} {exc.details()}")
            finally:
                self._queue.task_done()


def say(text: str) -> None:
    import sys

    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


async def ceiling(standin: StandIn, proc: ServiceProc, protocol: str, n: int, batch: int, topic: str,
                  payload_size: int) -> Ceiling:
    """The no-op behind the stand-in: ``n`` messages as sequential publish/bulk batches,
    each acked by the subscriber as it is delivered (as in the service's replay)."""
    await standin.connect(proc.port, protocol)
    channel = grpc.aio.insecure_channel(f"{HOST}:{proc.port}", options=CHANNEL_OPTIONS)
    acker = Acker(channel, protocol, "bench-ceiling-sub")
    wire = WireTimer(proc.port)
    wire.start()
    await asyncio.sleep(0.5)  # tcpdump attaches
    cpu0 = proc.cpu()
    acker.start(standin)
    try:
        seconds = await standin.ceiling(n, batch, topic, payload_bytes(payload_size))
    finally:
        wire_times = wire.stop()
        await acker.stop(standin, 60)
        cpu_us = (proc.cpu() - cpu0) / max(1, len(standin.deliveries)) * 1e6
        await channel.close(None)
    answer = Latency.of(t for t in standin.answer_times if not math.isnan(t))
    await standin.disconnect()
    return Ceiling(protocol, n, len(standin.deliveries) / seconds if seconds > 0 else float("nan"), cpu_us,
                   answer, Latency.of(wire_times) if wire_times else None)


def _in_order(payloads: list[bytes]) -> bool:
    """Each publisher's messages (payload prefix ``p:seq;``) in its own order."""
    last: dict[int, int] = {}
    for data in payloads:
        p_text, s_text = data.split(b";", 1)[0].split(b":")
        p_i, s_i = int(p_text), int(s_text)
        if s_i <= last.get(p_i, -1):
            return False
        last[p_i] = s_i
    return True


async def replay(standin: StandIn, proc: ServiceProc, backend: Backend, protocol: str, n: int, topic: str,
                 channels: int, payload_size: int, drain_timeout: float,
                 profile: tuple[Path, str, bool] | None = None) -> tuple[ReplayResult, list[str]]:
    """Store ``n`` messages on ``topic`` (16 publishers, each in its own order), subscribe
    a new client, measure the replay while the subscriber acknowledges each message as it
    is delivered; then the store must return to where it was. With ``profile`` = (dir, name, native), py-spy
    samples the service from the subscribe to the last delivery."""
    p = proto(protocol)
    backend.add_topics([topic])
    base = await backend.count() or 0
    say(f"{backend.name}/{protocol}: replay: storing {n:,} messages on {topic} from {PUBLISHERS} publishers")
    pool = [grpc.aio.insecure_channel(f"{HOST}:{proc.port}", options=CHANNEL_OPTIONS) for _ in range(channels)]
    profile_lines: list[str] = []
    acker: Acker | None = None
    try:
        pub_calls = [ch.unary_unary(p.path("OnMessagePublish"), None, None) for ch in pool]
        counter = iter(range(n))
        t0 = time.monotonic()

        async def publisher(k: int) -> None:
            clientid = f"bench-replay-pub-{k}"
            call = pub_calls[route(clientid, len(pool))]
            gen = GuidGen(0xE000 + k)
            seq = 0
            for _ in counter:
                data = payload_bytes(payload_size, b"%d:%d;" % (k, seq))
                req = p.pb.MessagePublishRequest(
                    message=message(p, clientid, topic, data, msgid=gen.gen().decode(), username=clientid),
                    meta=p.meta)
                await call(req.SerializeToString(), timeout=30)
                seq += 1

        await asyncio.gather(*(publisher(k) for k in range(PUBLISHERS)))
        preload_rate = n / (time.monotonic() - t0)
        stored = await wait_stored(backend, base + n, 30)
        say(f"{backend.name}/{protocol}: replay: {n:,} stored at {preload_rate:,.0f} msg/s (store count "
            f"{'?' if stored is None else f'{stored - base:,}'}); subscribing")

        await standin.connect(proc.port, protocol)
        standin.reset(n)
        subscriber = f"bench-replay-sub-{random.randrange(1 << 30)}"
        sub_call = pool[route(subscriber, len(pool))].unary_unary(p.path("OnSessionSubscribed"), None, None)
        info = client_info(p, subscriber, peerport=random.randrange(1024, 65535))
        req = p.pb.SessionSubscribedRequest(clientinfo=info, topic=topic, subopts=p.pb.SubOpts(qos=1), meta=p.meta)
        acker = Acker(pool[route(subscriber, len(pool))], protocol, subscriber)
        wire = WireTimer(proc.port, skip_first=True)  # the subscribe's connection: the acks
        wire.start()
        prof = None
        if profile is not None:
            prof = Profiler(proc.pid, profile[0], profile[1], subprocesses=proc.workers > 1, native=profile[2])
        await asyncio.sleep(1.0 if prof else 0.5)  # tcpdump / py-spy attach
        cpu0 = proc.cpu()
        acker.start(standin)
        t0 = time.monotonic()
        await sub_call(req.SerializeToString(), timeout=10)
        subscribe_ms = (time.monotonic() - t0) * 1e3
        try:
            complete = await standin.wait_delivered(timeout=600, stall=20)
        finally:
            wire_times = wire.stop()
            # the acks of the last deliveries are part of the replay's cost
            await acker.stop(standin, drain_timeout)
            cpu_us = (proc.cpu() - cpu0) / max(1, len(standin.deliveries)) * 1e6
            if prof is not None:
                prof.stop()
                profile_lines = [*summarize(prof.raw, len(standin.deliveries), cpu_us),
                                 f"  flame graph: {prof.svg}", ""]
        deliveries = [d for d in standin.deliveries if d.topic == topic]
        unique = len({d.payload for d in deliveries})
        answer = Latency.of(t for t in standin.answer_times if not math.isnan(t))
        result = ReplayResult(
            protocol=protocol, target=backend.name, n=n, preload_rate=preload_rate, subscribe_ms=subscribe_ms,
            delivered=len(deliveries), unique=unique, duplicates=len(deliveries) - unique,
            in_order=_in_order([d.payload for d in deliveries]),
            first_s=(deliveries[0].at - t0) if deliveries else float("nan"),
            last_s=(deliveries[-1].at - t0) if deliveries else float("nan"),
            answer=answer, wire=Latency.of(wire_times) if wire_times else None,
            projected=(len(deliveries) / (standin.service_gaps(t0) + sum(wire_times[-len(deliveries):]))
                       if wire_times and deliveries else None),
            bulk_calls=standin.bulk_calls, cpu_us=cpu_us,
            wire_note=wire.error or ("" if wire_times else "no pairs seen on the wire"), complete=complete,
            hook_errors=standin.hook_errors, empty_after_acks="-")
        say(f"{backend.name}/{protocol}: replay: {result.delivered:,} delivered in {result.last_s:.2f} s "
            f"({result.rate:,.0f} msg/s), in order {result.in_order}, duplicates {result.duplicates}, "
            f"server CPU {cpu_us:.0f} us/msg, answer on the wire p50 "
            f"{'-' if result.wire is None else f'{result.wire.p50:.3f}'} ms")

        reached, left = await wait_drain(backend, base, drain_timeout)
        result.empty_after_acks = "yes" if reached else f"no ({'?' if left is None else f'{left - base:,}'} left)"
        return result, profile_lines
    finally:
        standin.on_delivery = None
        if acker is not None:
            await acker.cancel()
        await standin.disconnect()
        await asyncio.gather(*(ch.close(None) for ch in pool), return_exceptions=True)
