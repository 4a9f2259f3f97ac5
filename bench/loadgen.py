"""Load generator that calls an ExHook server the way EMQX's exhook client does.

EMQX keeps a pool of gRPC connections (``pool_size`` 8) and routes each call by the
clientid; each MQTT client has at most one hook call in flight (the call blocks it),
all clients run in parallel. So the load is ``concurrency`` virtual clients, each in a
closed loop (call, wait for the answer, call again), spread over ``procs`` processes
(one Python process cannot saturate a grpc.aio server), the channels divided among
them. Requests are serialised once per (client, topic) and only the 32-hex id is
spliced in per call, so the generator spends its CPU on gRPC, not on protobuf.

Each process keeps the ids it published (and got an answer for), so a later ``ack``
phase can acknowledge exactly the stored messages.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import time
from array import array
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import grpc

from bench.common import (
    ACKED,
    CHANNEL_OPTIONS,
    HOST,
    IGNORE_ANSWER,
    PUBLISH,
    GuidGen,
    Latency,
    Template,
    ack_template,
    payload_bytes,
    publish_template,
    route,
)

_CALL_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class GenConfig:
    port: int
    procs: int = 2
    channels: int = 8
    concurrency: int = 64
    payload_size: int = 300
    topics: int = 100
    run_tag: int = 0
    cpus: tuple[int, ...] = ()  # CPU affinity of the generator processes (empty: any)


@dataclass(slots=True)
class PhaseResult:
    """One phase, merged over the generator processes."""

    calls: int = 0              # answered calls counted for the throughput
    seconds: float = 0.0        # the measured window
    errors: int = 0
    error_sample: str = ""
    latency: Latency = field(default_factory=Latency)
    gen_cpu_s: float = 0.0      # CPU the generator processes used in the phase
    wrong_answers: int = 0
    recorded_ids: int = 0       # ids kept for a later ack phase (after this phase)
    total: int = 0              # every answered call of the phase, warm-up included

    @property
    def rate(self) -> float:
        return self.calls / self.seconds if self.seconds > 0 else float("nan")


@dataclass(slots=True)
class _State:
    left: int = -1
    done: int = 0
    total: int = 0
    errors: int = 0
    wrong: int = 0
    first: float = math.inf
    last: float = 0.0
    err: str = ""


class _Worker:
    def __init__(self, index: int, cfg: GenConfig) -> None:
        self.index = index
        self.cfg = cfg
        # global virtual-client numbers owned by this process
        self.clients = list(range(index, cfg.concurrency, cfg.procs))
        self.nch = max(1, cfg.channels // cfg.procs)
        self.gen = GuidGen((cfg.run_tag << 16) | (os.getpid() & 0xFFFF))
        self.payload = payload_bytes(cfg.payload_size)
        self.topics = [f"bench/t/{n}" for n in range(cfg.topics)]
        self.pub_templates: dict[tuple[int, int], Template] = {}
        self.ack_templates: dict[tuple[int, int], Template] = {}
        # ids published and answered, not yet acknowledged
        self.ids = bytearray()
        self.id_topic = array("H")
        self.acked = 0
        self.channels: list[grpc.aio.Channel] = []
        self.pub_calls: list[Any] = []
        self.ack_calls: list[Any] = []

    async def connect(self) -> None:
        for _ in range(self.nch):
            ch = grpc.aio.insecure_channel(f"{HOST}:{self.cfg.port}", options=CHANNEL_OPTIONS)
            self.channels.append(ch)
            self.pub_calls.append(ch.unary_unary(PUBLISH, None, None))
            self.ack_calls.append(ch.unary_unary(ACKED, None, None))
        await asyncio.gather(*(asyncio.wait_for(ch.channel_ready(), 30) for ch in self.channels))

    async def close(self) -> None:
        await asyncio.gather(*(ch.close(None) for ch in self.channels), return_exceptions=True)

    def _pub(self, client: int, topic: int) -> Template:
        tmpl = self.pub_templates.get((client, topic))
        if tmpl is None:
            tmpl = publish_template(f"bench-pub-{client}", self.topics[topic], self.payload)
            self.pub_templates[(client, topic)] = tmpl
        return tmpl

    def _ack(self, client: int, topic: int) -> Template:
        tmpl = self.ack_templates.get((client, topic))
        if tmpl is None:
            tmpl = ack_template(f"bench-sub-{client}", f"bench-pub-{client}", self.topics[topic])
            self.ack_templates[(client, topic)] = tmpl
        return tmpl

    # -- phases -------------------------------------------------------------------------
    async def publish(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Closed-loop publishes until ``end`` (duration mode) or until ``count`` calls
        were made (count mode). Latency and throughput are taken over the window after
        the warm-up."""
        start: float = cmd["start_at"]
        count: int | None = cmd.get("count")
        if count is not None:
            count = count // self.cfg.procs + (1 if self.index < count % self.cfg.procs else 0)
            window_start, end = start, math.inf
        else:
            window_start, end = start + cmd["warmup"], start + cmd["warmup"] + cmd["duration"]
        record = bool(cmd.get("record_ids", True))
        state = _State(left=count if count is not None else -1)
        lat = array("f")
        await asyncio.sleep(max(0.0, start - time.monotonic()))
        cpu0 = _cpu()

        async def client_loop(client: int) -> None:
            call = self.pub_calls[route(f"bench-pub-{client}", self.nch)]
            rnd = random.Random(client)
            ntopics = self.cfg.topics
            while True:
                if count is not None:
                    if state.left <= 0:
                        return
                    state.left -= 1
                t0 = time.monotonic()
                if t0 >= end:
                    return
                topic = rnd.randrange(ntopics)
                mid = self.gen.gen()
                try:
                    answer = await call(self._pub(client, topic).build(mid), timeout=_CALL_TIMEOUT_S)
                except grpc.aio.AioRpcError as exc:
                    state.errors += 1
                    state.err = f"{exc.code().name}: {exc.details()}"
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
                    state.first = min(state.first, t1)
                    state.last = t1
                if record:
                    self.ids += mid
                    self.id_topic.append(topic)

        await asyncio.gather(*(client_loop(c) for c in self.clients))
        if count is not None:
            seconds = max(state.last - start, 1e-9)
        else:
            seconds = end - window_start
        return {"calls": state.done, "total": state.total, "seconds": seconds, "errors": state.errors,
                "err": state.err,
                "wrong": state.wrong, "lat": lat.tobytes(), "cpu": _cpu() - cpu0,
                "recorded": len(self.id_topic) - self.acked}

    async def ack(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Acknowledge the recorded, not yet acknowledged ids (at most ``count`` per
        process, for at most ``max_seconds``), with the same concurrency."""
        start: float = cmd["start_at"]
        limit = len(self.id_topic)
        if cmd.get("count") is not None:
            limit = min(limit, self.acked + cmd["count"])
        deadline = start + cmd.get("max_seconds", 3600.0)
        state = _State(last=start)
        lat = array("f")
        await asyncio.sleep(max(0.0, start - time.monotonic()))
        cpu0 = _cpu()

        async def client_loop(client: int) -> None:
            call = self.ack_calls[route(f"bench-sub-{client}", self.nch)]
            while self.acked < limit:
                k = self.acked
                self.acked += 1
                t0 = time.monotonic()
                if t0 >= deadline:
                    return
                mid = bytes(self.ids[k * 32:(k + 1) * 32])
                try:
                    await call(self._ack(client, self.id_topic[k]).build(mid), timeout=_CALL_TIMEOUT_S)
                except grpc.aio.AioRpcError as exc:
                    state.errors += 1
                    state.err = f"{exc.code().name}: {exc.details()}"
                    continue
                t1 = time.monotonic()
                lat.append(t1 - t0)
                state.done += 1
                state.last = max(state.last, t1)

        await asyncio.gather(*(client_loop(c) for c in self.clients))
        return {"calls": state.done, "total": state.done, "seconds": max(state.last - start, 1e-9),
                "errors": state.errors,
                "err": state.err, "wrong": 0, "lat": lat.tobytes(), "cpu": _cpu() - cpu0,
                "recorded": len(self.id_topic) - self.acked}

    async def serve(self, conn: Connection) -> None:
        loop = asyncio.get_running_loop()
        try:
            await self.connect()
            conn.send({"ready": True})
        except Exception as exc:  # report, then exit
            conn.send({"ready": False, "error": f"{type(exc).__name__}: {exc}"})
            return
        try:
            while True:
                cmd = await loop.run_in_executor(None, conn.recv)
                op = cmd["op"]
                if op == "stop":
                    break
                if op == "forget":
                    self.ids, self.id_topic, self.acked = bytearray(), array("H"), 0
                    conn.send({"ok": True})
                    continue
                conn.send(await (self.publish(cmd) if op == "publish" else self.ack(cmd)))
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


class LoadGen:
    """The generator processes of one target. Use as a context manager."""

    def __init__(self, cfg: GenConfig) -> None:
        import multiprocessing

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
        lat = array("f")
        res = PhaseResult()
        for part in parts:
            res.calls += part["calls"]
            res.total += part["total"]
            res.errors += part["errors"]
            res.wrong_answers += part["wrong"]
            res.error_sample = res.error_sample or part["err"]
            res.gen_cpu_s += part["cpu"]
            res.recorded_ids += part["recorded"]
            chunk = array("f")
            chunk.frombytes(part["lat"])
            lat.extend(chunk)
        # duration mode: one common window. Count mode: each process has its own share and
        # its own end; the phase rate is the sum of the processes' rates (a process that
        # finishes early must not leave the others' tail counted at part load).
        rate = sum(part["calls"] / part["seconds"] for part in parts if part["seconds"] > 0)
        res.seconds = res.calls / rate if rate > 0 else max(part["seconds"] for part in parts)
        res.latency = Latency.of(lat)
        return res

    async def publish(self, duration: float, warmup: float, record_ids: bool = True) -> PhaseResult:
        return await self._run({"op": "publish", "duration": duration, "warmup": warmup,
                                "record_ids": record_ids}, duration + warmup + 120)

    async def publish_count(self, count: int, timeout: float, record_ids: bool = True) -> PhaseResult:
        return await self._run({"op": "publish", "count": count, "record_ids": record_ids}, timeout)

    async def ack(self, per_proc_limit: int | None = None, max_seconds: float = 3600.0) -> PhaseResult:
        return await self._run({"op": "ack", "count": per_proc_limit, "max_seconds": max_seconds},
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
