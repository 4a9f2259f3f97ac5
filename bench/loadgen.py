"""Load generator that calls an ExHook server the way EMQX's exhook client does.

EMQX runs ``message.publish`` inside the publishing client's own process and waits for
the answer before it routes the message and sends PUBACK: one MQTT client has exactly
ONE ``OnMessagePublish`` in flight, whatever its MQTT in-flight window. ``message.acked``
runs in the subscriber's process once the subscriber's PUBACK arrives, i.e. after the
publish was answered and the message delivered. Calls travel over EMQX's pool of gRPC
connections (``pool_size``, 8 by default): a call goes over the connection its
clientid hashes to (the subscriber's clientid for ``message.acked``).

So the load here is N virtual MQTT clients. Client ``c`` is the device ``bench-pub-<c>``
publishing QoS 1, 300-byte payloads to its own topic ``bench/t/<c>`` in a closed loop
(next publish only after the answer); in the mixed phase the topic has one online
subscriber whose acks run in their own closed loop, each ack issued after the publish
was answered. The pool's connections are divided among ``procs`` processes (one
Python process cannot saturate a grpc.aio server): process ``i`` owns the connections
``k`` with ``k % procs == i`` and runs exactly the clients whose clientid hashes to one
of them, so every client's calls use the connection EMQX would pick. A subscriber's
clientid is chosen so that it hashes into the same process as its publisher.

Requests are serialised once per client and only the 32-hex id is spliced in per
call, so the generator spends its CPU on gRPC, not on protobuf. Each process keeps the
ids it published (and got an answer for), so a later ``ack`` phase can acknowledge
exactly the stored messages.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
import time
from array import array
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import grpc

from bench.common import (
    CHANNEL_OPTIONS,
    HOST,
    IGNORE_ANSWER,
    GuidGen,
    Latency,
    Template,
    ack_template,
    payload_bytes,
    proto,
    publish_template,
    route,
)

_CALL_TIMEOUT_S = 30.0
_ACK_DRAIN_S = 60.0


def publisher_id(c: int) -> str:
    return f"bench-pub-{c}"


def topic_of(c: int) -> str:
    return f"bench/t/{c}"


def subscriber_id(c: int, channels: int, procs: int) -> str:
    """The subscriber of client ``c``'s topic: a clientid that EMQX's hash puts on a
    connection owned by the same generator process as the publisher."""
    home = route(publisher_id(c), channels) % procs
    k = 0
    while True:
        cid = f"bench-sub-{c}" + (f"-{k}" if k else "")
        if route(cid, channels) % procs == home:
            return cid
        k += 1


@dataclass(frozen=True, slots=True)
class GenConfig:
    port: int
    protocol: str = "v3"
    procs: int = 2
    channels: int = 8
    clients: int = 256          # the most clients any phase will use
    payload_size: int = 300
    run_tag: int = 0
    cpus: tuple[int, ...] = ()  # CPU affinity of the generator processes (empty: any)


@dataclass(slots=True)
class PhaseResult:
    """One phase, merged over the generator processes."""

    calls: int = 0              # answered calls counted for the throughput (mixed: acks)
    seconds: float = 0.0        # the measured window
    errors: int = 0
    error_sample: str = ""
    latency: Latency = field(default_factory=Latency)
    gen_cpu_s: float = 0.0      # CPU the generator processes used in the phase
    wrong_answers: int = 0
    recorded_ids: int = 0       # ids kept for a later ack phase (after this phase)
    total: int = 0              # every answered call of the phase, warm-up included
    # mixed phase only
    published: int = 0          # publishes answered in the window
    ack_latency: Latency = field(default_factory=Latency)
    acks_total: int = 0
    backlog: int = 0            # acks not yet sent when the window closed
    drain_s: float = 0.0        # after the window: until every ack was answered

    @property
    def rate(self) -> float:
        return self.calls / self.seconds if self.seconds > 0 else float("nan")

    @property
    def publish_rate(self) -> float:
        return self.published / self.seconds if self.seconds > 0 else float("nan")


@dataclass(slots=True)
class _State:
    left: int = -1
    done: int = 0
    total: int = 0
    errors: int = 0
    wrong: int = 0
    last: float = 0.0
    err: str = ""
    acks: int = 0
    acks_total: int = 0
    published: int = 0

    def error(self, exc: grpc.aio.AioRpcError) -> None:
        self.errors += 1
        self.err = f"{exc.code().name}: {exc.details()}"


class _Worker:
    def __init__(self, index: int, cfg: GenConfig) -> None:
        self.index = index
        self.cfg = cfg
        self.p = proto(cfg.protocol)
        # pool connections owned by this process, and the clients whose clientid hashes to one
        self.owned = [k for k in range(cfg.channels) if k % cfg.procs == index]
        self.clients = [c for c in range(cfg.clients) if route(publisher_id(c), cfg.channels) % cfg.procs == index]
        self.gen = GuidGen((cfg.run_tag << 16) | (os.getpid() & 0xFFFF))
        self.payload = payload_bytes(cfg.payload_size)
        self.pub_tmpl: dict[int, Template] = {}
        self.ack_tmpl: dict[int, Template] = {}
        self.pub_call: dict[int, Any] = {}
        self.ack_call: dict[int, Any] = {}
        # ids published and answered, not yet acknowledged (and the client each belongs to)
        self.ids = bytearray()
        self.id_client = array("I")
        self.acked = 0
        self.channels: list[grpc.aio.Channel] = []

    async def connect(self) -> None:
        publish, acked = self.p.path("OnMessagePublish"), self.p.path("OnMessageAcked")
        by_index: dict[int, grpc.aio.Channel] = {}
        for k in self.owned:
            ch = grpc.aio.insecure_channel(f"{HOST}:{self.cfg.port}", options=CHANNEL_OPTIONS)
            by_index[k] = ch
            self.channels.append(ch)
        await asyncio.gather(*(asyncio.wait_for(ch.channel_ready(), 30) for ch in self.channels))
        for c in self.clients:
            pub, sub = publisher_id(c), subscriber_id(c, self.cfg.channels, self.cfg.procs)
            topic = topic_of(c)
            self.pub_tmpl[c] = publish_template(self.p, pub, topic, self.payload, username=pub)
            self.ack_tmpl[c] = ack_template(self.p, sub, pub, topic, self.payload)
            self.pub_call[c] = by_index[route(pub, self.cfg.channels)].unary_unary(publish, None, None)
            self.ack_call[c] = by_index[route(sub, self.cfg.channels)].unary_unary(acked, None, None)

    async def close(self) -> None:
        await asyncio.gather(*(ch.close(None) for ch in self.channels), return_exceptions=True)

    def _active(self, n: int) -> list[int]:
        return [c for c in self.clients if c < n]

    def _record(self, mid: bytes, c: int) -> None:
        self.ids += mid
        self.id_client.append(c)

    # -- phases -------------------------------------------------------------------------
    async def publish(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Closed-loop publishes of the first ``n`` clients until ``end`` (duration mode)
        or until ``count`` calls were made in all (count mode). Latency and throughput are
        taken over the window after the warm-up."""
        start: float = cmd["start_at"]
        clients = self._active(cmd["n"])
        count: int | None = cmd.get("count")
        if count is not None:
            share = len(clients) / max(1, cmd["n"])
            count = round(count * share)
            window_start, end = start, math.inf
        else:
            window_start, end = start + cmd["warmup"], start + cmd["warmup"] + cmd["duration"]
        record = bool(cmd.get("record_ids", True))
        state = _State(left=count if count is not None else -1)
        lat = array("f")
        await asyncio.sleep(max(0.0, start - time.monotonic()))
        cpu0 = _cpu()

        async def client_loop(c: int) -> None:
            call, tmpl, gen = self.pub_call[c], self.pub_tmpl[c], self.gen
            while True:
                if count is not None:
                    if state.left <= 0:
                        return
                    state.left -= 1
                t0 = time.monotonic()
                if t0 >= end:
                    return
                mid = gen.gen()
                try:
                    answer = await call(tmpl.build(mid), timeout=_CALL_TIMEOUT_S)
                except grpc.aio.AioRpcError as exc:
                    state.error(exc)
                    await asyncio.sleep(0.01)
                    continue
                t1 = time.monotonic()
                state.total += 1
                if answer != IGNORE_ANSWER:
                    state.wrong += 1
                if t0 >= window_start:
                    lat.append(t1 - t0)
                if window_start <= t1 <= end:
                    state.done += 1
                    state.last = t1
                if record:
                    self._record(mid, c)

        await asyncio.gather(*(client_loop(c) for c in clients))
        seconds = max(state.last - start, 1e-9) if count is not None else end - window_start
        return self._answer(state, seconds, lat, cpu0)

    async def mixed(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Publish + acked: each of the first ``n`` clients publishes in a closed loop; once
        a publish is answered the message is the subscriber's to acknowledge, and the
        subscriber's acks run in their own closed loop (one in flight). Throughput =
        messages acknowledged in the window; after it, the remaining acks are sent so the
        store ends where it began."""
        start: float = cmd["start_at"]
        window_start, end = start + cmd["warmup"], start + cmd["warmup"] + cmd["duration"]
        clients = self._active(cmd["n"])
        state = _State()
        lat, ack_lat = array("f"), array("f")
        queues = {c: asyncio.Queue[bytes]() for c in clients}
        await asyncio.sleep(max(0.0, start - time.monotonic()))
        cpu0 = _cpu()

        async def publisher(c: int) -> None:
            call, tmpl, gen, queue = self.pub_call[c], self.pub_tmpl[c], self.gen, queues[c]
            try:
                while (t0 := time.monotonic()) < end:
                    mid = gen.gen()
                    try:
                        answer = await call(tmpl.build(mid), timeout=_CALL_TIMEOUT_S)
                    except grpc.aio.AioRpcError as exc:
                        state.error(exc)
                        await asyncio.sleep(0.01)
                        continue
                    t1 = time.monotonic()
                    state.total += 1
                    if answer != IGNORE_ANSWER:
                        state.wrong += 1
                    if t0 >= window_start:
                        lat.append(t1 - t0)
                    if window_start <= t1 <= end:
                        state.published += 1
                    queue.put_nowait(mid)
            finally:
                queue.put_nowait(b"")  # end of this client's messages

        async def subscriber(c: int) -> None:
            call, tmpl, queue = self.ack_call[c], self.ack_tmpl[c], queues[c]
            while mid := await queue.get():
                t0 = time.monotonic()
                try:
                    await call(tmpl.build(mid), timeout=_CALL_TIMEOUT_S)
                except grpc.aio.AioRpcError as exc:
                    state.error(exc)
                    continue
                t1 = time.monotonic()
                state.acks_total += 1
                if t0 >= window_start and t1 <= end:
                    ack_lat.append(t1 - t0)
                if window_start <= t1 <= end:
                    state.done += 1

        subs = [asyncio.ensure_future(subscriber(c)) for c in clients]
        await asyncio.gather(*(publisher(c) for c in clients))
        backlog = sum(max(0, q.qsize() - 1) for q in queues.values())
        drained = time.monotonic()
        if subs:
            _, pending = await asyncio.wait(subs, timeout=_ACK_DRAIN_S)
            for task in pending:
                task.cancel()
        out = self._answer(state, end - window_start, lat, cpu0)
        out.update(published=state.published, ack_lat=ack_lat.tobytes(), acks_total=state.acks_total,
                   backlog=backlog, drain=time.monotonic() - drained)
        return out

    async def ack(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Acknowledge the recorded, not yet acknowledged ids (at most ``count`` per
        process, for at most ``max_seconds``), each subscriber of the first ``n`` clients
        with one ack in flight."""
        start: float = cmd["start_at"]
        limit = len(self.id_client)
        if cmd.get("count") is not None:
            limit = min(limit, self.acked + cmd["count"])
        deadline = start + cmd.get("max_seconds", 3600.0)
        state = _State(last=start)
        lat = array("f")
        await asyncio.sleep(max(0.0, start - time.monotonic()))
        cpu0 = _cpu()

        async def subscriber() -> None:
            while self.acked < limit:
                k = self.acked
                self.acked += 1
                t0 = time.monotonic()
                if t0 >= deadline:
                    return
                c = self.id_client[k]
                try:
                    await self.ack_call[c](self.ack_tmpl[c].build(bytes(self.ids[k * 32:(k + 1) * 32])),
                                           timeout=_CALL_TIMEOUT_S)
                except grpc.aio.AioRpcError as exc:
                    state.error(exc)
                    continue
                t1 = time.monotonic()
                lat.append(t1 - t0)
                state.done += 1
                state.total += 1
                state.last = max(state.last, t1)

        await asyncio.gather(*(subscriber() for _ in self._active(cmd["n"])))
        return self._answer(state, max(state.last - start, 1e-9), lat, cpu0)

    def _answer(self, state: _State, seconds: float, lat: array[float], cpu0: float) -> dict[str, Any]:
        return {"calls": state.done, "total": state.total, "seconds": seconds, "errors": state.errors,
                "err": state.err, "wrong": state.wrong, "lat": lat.tobytes(), "cpu": _cpu() - cpu0,
                "recorded": len(self.id_client) - self.acked}

    async def serve(self, conn: Connection) -> None:
        loop = asyncio.get_running_loop()
        try:
            await self.connect()
            conn.send({"ready": True})
        except Exception as exc:  # report, then exit
            conn.send({"ready": False, "error": f"{type(exc).__name__}: {exc}"})
            return
        phases = {"publish": self.publish, "mixed": self.mixed, "ack": self.ack}
        try:
            while True:
                cmd = await loop.run_in_executor(None, conn.recv)
                op = cmd["op"]
                if op == "stop":
                    break
                if op == "forget":
                    self.ids, self.id_client, self.acked = bytearray(), array("I"), 0
                    conn.send({"ok": True})
                    continue
                conn.send(await phases[op](cmd))
        finally:
            await self.close()


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def worker_entry(index: int, cfg: GenConfig, conn: Connection) -> None:
    if cfg.cpus:
        os.sched_setaffinity(0, cfg.cpus)
    worker = _Worker(index, cfg)
    try:
        import uvloop
    except ImportError:
        asyncio.run(worker.serve(conn))
    else:
        uvloop.run(worker.serve(conn))


def _latencies(parts: list[dict[str, Any]], key: str) -> Latency:
    lat = array("f")
    for part in parts:
        chunk = array("f")
        chunk.frombytes(part.get(key, b""))
        lat.extend(chunk)
    return Latency.of(lat)


class LoadGen:
    """The generator processes of one server. Use as a context manager."""

    def __init__(self, cfg: GenConfig) -> None:
        import multiprocessing

        if cfg.procs > cfg.channels:
            cfg = dataclasses.replace(cfg, procs=cfg.channels)
        self.cfg = cfg
        self.started_at = 0.0
        ctx = multiprocessing.get_context("spawn")
        self._conns: list[Connection] = []
        self._procs: list[Any] = []
        for i in range(cfg.procs):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker_entry, args=(i, cfg, child), name=f"bench-loadgen-{i}", daemon=True)
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)

    def __enter__(self) -> LoadGen:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        # after a failure or cancellation the workers may be mid-phase: do not wait for them
        self.close(wait=1.0 if exc_type is not None else 5.0)

    async def ready(self) -> None:
        answers = await asyncio.gather(*(asyncio.to_thread(self._recv, c, 60) for c in self._conns))
        for answer in answers:
            if not answer.get("ready"):
                raise RuntimeError(f"load generator could not connect: {answer.get('error')}")

    @staticmethod
    def _recv(conn: Connection, timeout: float) -> dict[str, Any]:
        if not conn.poll(timeout):
            raise TimeoutError("load generator process did not answer")
        result: dict[str, Any] = conn.recv()
        return result

    async def _run(self, cmd: dict[str, Any], timeout: float) -> PhaseResult:
        self.started_at = time.monotonic() + 0.3
        cmd = {**cmd, "start_at": self.started_at}
        for conn in self._conns:
            conn.send(cmd)
        parts = await asyncio.gather(*(asyncio.to_thread(self._recv, c, timeout) for c in self._conns))
        res = PhaseResult()
        for part in parts:
            res.calls += part["calls"]
            res.total += part["total"]
            res.errors += part["errors"]
            res.wrong_answers += part["wrong"]
            res.error_sample = res.error_sample or part["err"]
            res.gen_cpu_s += part["cpu"]
            res.recorded_ids += part["recorded"]
            res.published += part.get("published", 0)
            res.acks_total += part.get("acks_total", 0)
            res.backlog += part.get("backlog", 0)
            res.drain_s = max(res.drain_s, part.get("drain", 0.0))
        res.latency = _latencies(parts, "lat")
        res.ack_latency = _latencies(parts, "ack_lat")
        if cmd.get("count") is None:
            res.seconds = max(part["seconds"] for part in parts)
        else:
            # count mode: each process has its own share and its own end; the phase rate is
            # the sum of the processes' rates (one that finishes early must not leave the
            # others' tail counted at part load)
            rate = sum(part["calls"] / part["seconds"] for part in parts if part["calls"])
            res.seconds = res.calls / rate if rate > 0 else max(part["seconds"] for part in parts)
        return res

    async def publish(self, n: int, duration: float, warmup: float, record_ids: bool = True) -> PhaseResult:
        return await self._run({"op": "publish", "n": n, "duration": duration, "warmup": warmup,
                                "record_ids": record_ids}, duration + warmup + 120)

    async def publish_count(self, n: int, count: int, timeout: float, record_ids: bool = True) -> PhaseResult:
        return await self._run({"op": "publish", "n": n, "count": count, "record_ids": record_ids}, timeout)

    async def mixed(self, n: int, duration: float, warmup: float) -> PhaseResult:
        return await self._run({"op": "mixed", "n": n, "duration": duration, "warmup": warmup},
                               duration + warmup + _ACK_DRAIN_S + 120)

    async def ack(self, n: int, per_proc_limit: int | None = None, max_seconds: float = 3600.0) -> PhaseResult:
        return await self._run({"op": "ack", "n": n, "count": per_proc_limit, "max_seconds": max_seconds},
                               max_seconds + 120)

    async def forget(self) -> None:
        for conn in self._conns:
            conn.send({"op": "forget"})
        await asyncio.gather(*(asyncio.to_thread(self._recv, c, 30) for c in self._conns))

    def close(self, wait: float = 5.0) -> None:
        for conn in self._conns:
            try:
                conn.send({"op": "stop"})
            except (OSError, ValueError):
                pass
        for proc in self._procs:
            proc.join(wait)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(1)
        for conn in self._conns:
            conn.close()
