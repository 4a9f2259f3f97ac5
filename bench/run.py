"""Orchestration of one benchmark run: the no-op ceiling, then the service on each
backend (publish, ack, replay, optional profile and 1M-message runs), the raw
backend ceilings, the table and BENCHMARKS.md. Every process it starts is stopped
in a ``finally`` (also on Ctrl-C / SIGTERM / failure)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import math
import os
import random
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from bench import raw as rawmod
from bench.common import (
    ACKED,
    CHANNEL_OPTIONS,
    HOST,
    META,
    PUBLISH,
    REPLAY_PROPERTY,
    SUBSCRIBED,
    GuidGen,
    Latency,
    busy_seconds,
    client_info,
    loadavg,
    machine,
    message,
    payload_bytes,
    route,
)
from bench.loadgen import GenConfig, LoadGen, PhaseResult
from bench.profile import Profiler, pyspy, summarize
from bench.report import Report, Row, mb, pct, write_benchmarks
from bench.service import (
    BACKENDS,
    ROOT,
    Backend,
    NoopProc,
    ServiceProc,
    SqliteBackend,
    make_backend,
    missing_backend,
    remove_workdir,
    workdir,
)
from bench.standin import StandIn
from bench.wire import WireTimer
from exhook.pb.v3 import exhook_pb2 as pb

# counters that should stay at zero in a healthy run (shown in the table when they moved)
_TROUBLE_COUNTERS = ("publish_deadline_answers_total", "writes_dropped_total", "store_failures_total",
                     "replay_failures_total", "client_jobs_dropped_total")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--backends", default=",".join(BACKENDS),
                   help="comma-separated service backends to measure (empty: none)")
    p.add_argument("--no-noop", action="store_true", help="skip the no-op ceiling")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds of each publish phase")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each publish window")
    p.add_argument("--procs", type=int, default=2, help="load-generator processes")
    p.add_argument("--concurrency", type=int, default=64, help="calls in flight (virtual MQTT clients)")
    p.add_argument("--channels", type=int, default=8, help="gRPC connections (EMQX pool_size)")
    p.add_argument("--payload", type=int, default=300, help="payload bytes")
    p.add_argument("--topics", type=int, default=100, help="distinct topics bench/t/<n>")
    p.add_argument("--workers", type=int, default=1, help="server processes (service --workers, no-op too)")
    p.add_argument("--pin", choices=("auto", "on", "off"), default="auto",
                   help="CPU affinity: the server on the first --server-cpus CPUs, the load generators and "
                        "this process on the others (auto: on with at least 2 CPUs); the database servers "
                        "are not pinned")
    p.add_argument("--server-cpus", type=int, default=1, help="CPUs given to the server when pinned")
    p.add_argument("--batch-size", type=int, default=100, help="service batch_size")
    p.add_argument("--batch-time", type=int, default=10, help="service batch_time (ms)")
    p.add_argument("--replay", type=int, default=10_000, help="messages replayed to a new subscriber (0: skip)")
    p.add_argument("--raw-seconds", type=float, default=5.0, help="seconds of each raw backend ceiling (0: skip)")
    p.add_argument("--ack-max-seconds", type=float, default=60.0, help="cap on each ack phase")
    p.add_argument("--drain-timeout", type=float, default=60.0,
                   help="wait at most this long for the store to empty after the acks")
    p.add_argument("--sqlite-synchronous", default="FULL", help="PRAGMA synchronous of the raw SQLite ceiling")
    p.add_argument("--profile", metavar="DIR", default=None,
                   help="also profile each service with py-spy (extra, unmeasured phases); output in DIR")
    p.add_argument("--profile-native", action="store_true", help="py-spy --native (C frames too)")
    p.add_argument("--big", action="store_true",
                   help="also: RSS after 10k vs 1M stored+acked, publish throughput with 1M stored (long)")
    p.add_argument("--big-count", type=int, default=1_000_000, help="messages of the --big fill")
    p.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"), help="file whose generated section is written")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    p.add_argument("--wait-idle", type=float, default=30.0,
                   help="before each server, wait up to this many seconds for the machine to be idle "
                        "(other processes < 0.2 cores); 0: do not wait")
    args = p.parse_args(argv)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    cpus = sorted(os.sched_getaffinity(0))
    pin = args.pin == "on" or (args.pin == "auto" and len(cpus) >= 2)
    if pin and len(cpus) > args.server_cpus >= 1:
        args.server_cpu_set = tuple(cpus[:args.server_cpus])
        args.gen_cpu_set = tuple(cpus[args.server_cpus:])
    else:
        args.server_cpu_set = args.gen_cpu_set = ()
    for b in args.backends:
        if b not in BACKENDS:
            p.error(f"unknown backend {b!r} (expected {', '.join(BACKENDS)})")
    if args.procs < 1 or args.concurrency < args.procs or args.channels < 1:
        p.error("need procs >= 1, concurrency >= procs, channels >= 1")
    return args


def say(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
@dataclass
class ReplayResult:
    n: int
    preload_rate: float
    subscribe_ms: float
    delivered: int
    unique: int
    duplicates: int
    in_order: bool
    first_s: float
    last_s: float
    answer: Latency
    wire: Latency | None
    wire_note: str
    projected: float | None   # N / (service-side gaps + Σ wire answer times)
    bulk_calls: int
    cpu_us: float             # server CPU per replayed message, subscribe to last delivery
    complete: bool
    hook_errors: int
    empty_after_acks: str

    @property
    def rate(self) -> float:
        return self.delivered / self.last_s if self.last_s > 0 else float("nan")


@dataclass
class TargetResult:
    name: str
    publish: PhaseResult | None = None
    publish_cpu_us: float | None = None
    publish_cpu_share: float | None = None
    foreign_cores: float | None = None
    backend_per_msg: dict[str, float] = field(default_factory=dict)
    backend_per_ack: dict[str, float] = field(default_factory=dict)
    stored_after_publish: int | None = None
    ack: PhaseResult | None = None
    ack_cpu_us: float | None = None
    drain_s: float | None = None
    left_after_drain: int | None = None
    rss_idle: int | None = None
    rss_publish: int | None = None
    rss_peak: int | None = None
    rss_ack: int | None = None
    rss_replay: int | None = None
    probe: Latency | None = None
    probe_wire: Latency | None = None
    replay: ReplayResult | None = None
    raw: rawmod.RawResult | None = None
    raw_error: str = ""
    counters: dict[str, float] = field(default_factory=dict)
    big: dict[str, Any] = field(default_factory=dict)
    profile: list[str] = field(default_factory=list)
    error: str = ""
    busy_warning: str = ""


class RssSampler:
    """The peak RSS of a process tree while a phase runs."""

    def __init__(self, proc: ServiceProc) -> None:
        self.proc = proc
        self.peak = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.peak = max(self.peak, self.proc.rss())
            await asyncio.sleep(0.5)

    def __enter__(self) -> RssSampler:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
        self.peak = max(self.peak, self.proc.rss())


async def wait_drain(backend: Backend, target: int, timeout: float, stall: float = 15.0) -> tuple[bool, int | None]:
    """Until the store holds at most ``target`` messages; (reached, count)."""
    start = time.monotonic()
    last, since = None, start
    while True:
        n = await backend.count()
        if n is None:
            return False, None
        now = time.monotonic()
        if n <= target:
            return True, n
        if n != last:
            last, since = n, now
        if now - since > stall or now - start > timeout:
            return False, n
        await asyncio.sleep(0.1)


# ---------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tag = f"{os.getpid() % 10000:04d}{int(time.time()) % 100000:05d}"
        self.topics = [f"bench/t/{n}" for n in range(args.topics)]
        self.replay_topic = f"bench/replay/{self.tag}"
        self.dir = workdir()
        self.standin = StandIn()
        self.noop: TargetResult | None = None
        self.results: list[TargetResult] = []
        self.skipped: list[str] = []
        self.load_before = loadavg()
        self.revision = git_revision()
        self.replay_profile: list[str] = []

    def gen_config(self, port: int) -> GenConfig:
        a = self.args
        return GenConfig(port=port, procs=a.procs, channels=a.channels, concurrency=a.concurrency,
                         payload_size=a.payload, topics=a.topics, run_tag=random.randrange(1 << 16),
                         cpus=a.gen_cpu_set)

    # -- publish + ack -------------------------------------------------------------------
    async def load_phases(self, res: TargetResult, proc: ServiceProc, backend: Backend | None,
                          lg: LoadGen) -> None:
        a = self.args
        say(f"{res.name}: publish, {a.concurrency} in flight, {a.warmup:.0f} s warm-up + {a.duration:.0f} s")
        stats0 = await backend.server_stats() if backend is not None else {}
        cpu0, busy0, own0 = proc.cpu(), busy_seconds(), _own_cpu()
        with RssSampler(proc) as sampler:
            pub = await lg.publish(a.duration, a.warmup)
        cpu = proc.cpu() - cpu0
        if backend is not None:
            stats1 = await backend.server_stats()
            res.backend_per_msg = {k: (stats1[k] - v) / max(pub.total, 1) for k, v in stats0.items() if k in stats1}
        foreign = busy_seconds() - busy0 - cpu - pub.gen_cpu_s - (_own_cpu() - own0)
        res.foreign_cores = max(0.0, foreign / (a.duration + a.warmup + 0.3))
        res.publish = pub
        res.rss_peak = sampler.peak
        res.publish_cpu_us = cpu / max(pub.total, 1) * 1e6
        res.publish_cpu_share = cpu / (a.duration + a.warmup)
        res.rss_publish = proc.rss()
        say(f"{res.name}: {pub.rate:,.0f} msg/s, p50 {pub.latency.p50:.2f} ms, p99 {pub.latency.p99:.2f} ms, "
            f"server {res.publish_cpu_us:.0f} us CPU/msg, errors {pub.errors} {pub.error_sample}")
        if backend is not None:
            await asyncio.sleep(0.5)
            res.stored_after_publish = await backend.count()
        say(f"{res.name}: acknowledging {pub.recorded_ids:,} messages")
        stats0 = await backend.server_stats() if backend is not None else {}
        cpu0 = proc.cpu()
        ack = await lg.ack(max_seconds=a.ack_max_seconds)
        res.ack_cpu_us = (proc.cpu() - cpu0) / max(ack.total, 1) * 1e6
        res.ack = ack
        if backend is not None:
            reached, left = await wait_drain(backend, 0, a.drain_timeout)
            res.left_after_drain = left
            if reached:
                res.drain_s = time.monotonic() - lg.started_at
            stats1 = await backend.server_stats()
            res.backend_per_ack = {k: (stats1[k] - v) / max(ack.total, 1) for k, v in stats0.items() if k in stats1}
        res.rss_ack = proc.rss()
        say(f"{res.name}: acks {ack.rate:,.0f}/s, p99 {ack.latency.p99:.2f} ms; store empty after "
            f"{'-' if res.drain_s is None else f'{res.drain_s:.1f} s'} (left {left_text(res.left_after_drain)})")

    # -- no-op -----------------------------------------------------------------------------
    async def run_noop(self) -> None:
        res = TargetResult("no-op")
        proc = NoopProc(self.args.workers, self.dir, self.args.server_cpu_set)
        try:
            res.busy_warning = await wait_idle(self.args.wait_idle)
            proc.start()
            await proc.wait_ready()
            res.rss_idle = proc.rss()
            with LoadGen(self.gen_config(proc.port)) as lg:
                await lg.ready()
                await self.load_phases(res, proc, None, lg)
                if self.args.profile:
                    await self.profile(res, proc, None, lg)
            await self.standin.connect(proc.port)
            wire = WireTimer(proc.port)
            wire.start()
            await asyncio.sleep(0.5)  # tcpdump attaches
            times = await self.standin.probe(2000, self.replay_topic, payload_bytes(self.args.payload),
                                             {REPLAY_PROPERTY: "0" * 32})
            wire_times = wire.stop()
            res.probe = Latency.of(times)
            res.probe_wire = Latency.of(wire_times) if wire_times else None
            await self.standin.disconnect()
        except Exception as exc:
            res.error = f"{type(exc).__name__}: {exc}"
            say(f"no-op failed: {res.error}")
        finally:
            proc.stop()
        self.noop = res

    # -- the service -----------------------------------------------------------------------
    async def run_backend(self, name: str) -> None:
        reason = missing_backend(name)
        if reason is not None:
            self.skipped.append(f"{name}: {reason}")
            say(f"SKIP {name}: {reason}")
            return
        backend = make_backend(name, self.tag, self.dir,
                               [*self.topics, self.replay_topic, f"{self.replay_topic}-prof"])
        try:
            await backend.setup()
        except Exception as exc:
            self.skipped.append(f"{name}: backend server unreachable: {type(exc).__name__}: {exc}")
            say(f"SKIP {name}: {exc}")
            return
        try:
            await self._measure_backend(name, backend)
        finally:  # also on Ctrl-C / SIGTERM: drop the benchmark's keys / database
            with contextlib.suppress(Exception):
                await backend.cleanup()

    async def _measure_backend(self, name: str, backend: Backend) -> None:
        a = self.args
        res = TargetResult(name)
        self.results.append(res)
        proc = ServiceProc(backend, a.workers, a.batch_size, a.batch_time, self.standin.port, self.dir,
                           a.server_cpu_set)
        try:
            res.busy_warning = await wait_idle(a.wait_idle)
            say(f"{name}: starting the service (workers {a.workers}, batch_size {a.batch_size})")
            proc.start()
            await proc.wait_ready()
            res.rss_idle = proc.rss()
            with LoadGen(self.gen_config(proc.port)) as lg:
                await lg.ready()
                await self.load_phases(res, proc, backend, lg)
                if a.replay > 0:
                    res.replay = await self.replay(proc, backend)
                    res.rss_replay = proc.rss()
                if a.profile:
                    await self.profile(res, proc, backend, lg)
                if a.big:
                    await self.big(res, proc, backend, lg)
        except Exception as exc:
            res.error = f"{type(exc).__name__}: {exc}"
            say(f"{name} failed: {res.error}")
        finally:
            await self.standin.disconnect()
            res.counters = proc.counters()
            proc.stop()
            errors = proc.log_lines("level=error") + proc.log_lines("level=critical")
            if errors:
                say(f"{name}: the service logged {len(errors)} errors, first: {errors[0][:300]}")
        if a.raw_seconds > 0:
            await wait_idle(min(30.0, a.wait_idle))
            say(f"{name}: raw backend ceiling, {a.raw_seconds:.0f} s")
            try:
                res.raw = await self.raw(backend)
            except Exception as exc:
                res.raw_error = f"{type(exc).__name__}: {exc}"
                say(f"{name}: raw ceiling failed: {res.raw_error}")

    async def raw(self, backend: Backend) -> rawmod.RawResult:
        a = self.args
        if backend.name == "redis":
            return await rawmod.redis_ceiling(a.raw_seconds, a.batch_size, a.payload, self.topics, self.tag)
        if backend.name == "mysql":
            return await rawmod.mysql_ceiling(a.raw_seconds, a.batch_size, a.payload, self.topics,
                                              backend.database)  # type: ignore[attr-defined]
        assert isinstance(backend, SqliteBackend)
        return await rawmod.sqlite_ceiling(a.raw_seconds, a.batch_size, a.payload, self.topics, self.dir,
                                           backend.path, a.sqlite_synchronous)

    # -- replay ----------------------------------------------------------------------------
    async def replay(self, proc: ServiceProc, backend: Backend, topic: str | None = None,
                     profile: str | None = None) -> ReplayResult:
        """Store N messages on one topic, subscribe a new client, measure the replay.
        With ``profile``, py-spy samples the service from the subscribe to the last
        delivery (into ``--profile DIR/<profile>.txt``)."""
        n = self.args.replay
        topic = topic or self.replay_topic
        publishers = 16
        say(f"{backend.name}: replay: storing {n:,} messages on {topic} from {publishers} publishers")
        channels = [grpc.aio.insecure_channel(f"{HOST}:{proc.port}", options=CHANNEL_OPTIONS)
                    for _ in range(self.args.channels)]
        try:
            pub_calls = [ch.unary_unary(PUBLISH, None, None) for ch in channels]
            counter = iter(range(n))
            t0 = time.monotonic()

            async def publisher(p: int) -> None:
                clientid = f"bench-replay-pub-{p}"
                call = pub_calls[route(clientid, len(channels))]
                gen = GuidGen(0xE000 + p)
                seq = 0
                for _ in counter:
                    payload = payload_bytes(self.args.payload, b"%d:%d;" % (p, seq))
                    req = pb.MessagePublishRequest(message=message(clientid, topic, payload,
                                                                   msgid=gen.gen().decode()), meta=META)
                    await call(req.SerializeToString(), timeout=30)
                    seq += 1

            await asyncio.gather(*(publisher(p) for p in range(publishers)))
            preload_rate = n / (time.monotonic() - t0)
            await asyncio.sleep(0.5)
            stored = await backend.count()
            say(f"{backend.name}: replay: {n:,} stored at {preload_rate:,.0f} msg/s (store count "
                f"{left_text(stored)}); subscribing")

            await self.standin.connect(proc.port)
            self.standin.reset(n)
            subscriber = "bench-replay-sub"
            sub_call = channels[route(subscriber, len(channels))].unary_unary(SUBSCRIBED, None, None)
            info = client_info(subscriber, peerport=random.randrange(1024, 65535))
            req = pb.SessionSubscribedRequest(clientinfo=info, topic=topic, subopts=pb.SubOpts(qos=1), meta=META)
            wire = WireTimer(proc.port)
            wire.start()
            prof = None
            if profile is not None:
                prof = Profiler(proc.pid, Path(self.args.profile), profile, subprocesses=self.args.workers > 1,
                                native=self.args.profile_native)
            await asyncio.sleep(1.0 if prof else 0.5)  # tcpdump / py-spy attach
            cpu0 = proc.cpu()
            t0 = time.monotonic()
            await sub_call(req.SerializeToString(), timeout=10)
            subscribe_ms = (time.monotonic() - t0) * 1e3
            try:
                complete = await self.standin.wait_delivered(timeout=600, stall=20)
            finally:
                wire_times = wire.stop()
                cpu_us = (proc.cpu() - cpu0) / max(1, len(self.standin.deliveries)) * 1e6
                if prof is not None:
                    prof.stop()
                    self.replay_profile = [*summarize(prof.raw, len(self.standin.deliveries), cpu_us),
                                           f"  flame graph: {prof.svg}", ""]
            deliveries = [d for d in self.standin.deliveries if d.topic == topic]
            last: dict[int, int] = {}
            in_order = True
            for d in deliveries:
                p_text, s_text = d.payload.split(b";", 1)[0].split(b":")
                p_i, s_i = int(p_text), int(s_text)
                if s_i <= last.get(p_i, -1):
                    in_order = False
                last[p_i] = s_i
            unique = len({d.replay_of or d.payload for d in deliveries})
            answer = Latency.of(t for t in self.standin.answer_times if not math.isnan(t))
            result = ReplayResult(
                n=n, preload_rate=preload_rate, subscribe_ms=subscribe_ms, delivered=len(deliveries),
                unique=unique, duplicates=len(deliveries) - unique, in_order=in_order,
                first_s=(deliveries[0].at - t0) if deliveries else float("nan"),
                last_s=(deliveries[-1].at - t0) if deliveries else float("nan"),
                answer=answer, wire=Latency.of(wire_times) if wire_times else None,
                projected=(len(deliveries) / (self.standin.service_gaps(t0) + sum(wire_times[-len(deliveries):]))
                           if wire_times and deliveries else None),
                bulk_calls=self.standin.bulk_calls, cpu_us=cpu_us,
                wire_note=wire.error or ("" if wire_times else "no pairs seen on the wire"), complete=complete,
                hook_errors=self.standin.hook_errors, empty_after_acks="-")
            say(f"{backend.name}: replay: {result.delivered:,} delivered in {result.last_s:.2f} s "
                f"({result.rate:,.0f} msg/s), in order {in_order}, duplicates {result.duplicates}, "
                f"replay publish round trip p50 {answer.p50:.3f} ms, server answer on the wire p50 "
                f"{'-' if result.wire is None else f'{result.wire.p50:.3f}'} ms")

            # the subscriber acknowledges what it got (the ids the replays were published with)
            ack_calls = [ch.unary_unary(ACKED, None, None) for ch in channels]
            call = ack_calls[route(subscriber, len(channels))]
            queue = list(deliveries)

            async def acker() -> None:
                while queue:
                    d = queue.pop()
                    msg = message("http_api", d.topic, b"", msgid=d.msgid)
                    await call(pb.MessageAckedRequest(clientinfo=client_info(subscriber), message=msg,
                                                      meta=META).SerializeToString(), timeout=30)

            await asyncio.gather(*(acker() for _ in range(16)))
            reached, left = await wait_drain(backend, 0, self.args.drain_timeout)
            result.empty_after_acks = "yes" if reached else f"no ({left_text(left)} left)"
            return result
        finally:
            await asyncio.gather(*(ch.close(None) for ch in channels), return_exceptions=True)

    # -- profile ---------------------------------------------------------------------------
    async def profile(self, res: TargetResult, proc: ServiceProc, backend: Backend | None, lg: LoadGen) -> None:
        """Extra, unmeasured phases under py-spy: publish, then ack."""
        a = self.args
        out = Path(a.profile)
        if pyspy() is None:
            res.profile = ["py-spy is not installed: .venv/bin/pip install py-spy"]
            return
        await lg.forget()
        name = res.name.replace("/", "-")
        for phase in ("publish", "ack"):
            say(f"{res.name}: py-spy profile of the {phase} path")
            prof = Profiler(proc.pid, out, f"{name}-{phase}", subprocesses=a.workers > 1, native=a.profile_native)
            try:
                await asyncio.sleep(1.0)  # py-spy attaches
                cpu0 = proc.cpu()
                if phase == "publish":
                    result = await lg.publish(a.duration, 0.5)
                else:
                    result = await lg.ack(max_seconds=a.ack_max_seconds)
                    if backend is not None:
                        await wait_drain(backend, 0, a.drain_timeout)
                cpu_us = (proc.cpu() - cpu0) / max(result.total, 1) * 1e6
            finally:
                prof.stop()
            lines = summarize(prof.raw, result.total, cpu_us)
            res.profile += [*lines, f"  flame graph: {prof.svg}", ""]
        if backend is not None and a.replay > 0:
            say(f"{res.name}: py-spy profile of a replay")
            self.replay_profile = []
            await self.replay(proc, backend, topic=f"{self.replay_topic}-prof", profile=f"{name}-replay")
            res.profile += self.replay_profile
        (out / f"{name}-summary.txt").write_text("\n".join(res.profile) + "\n")
        for line in res.profile:
            print(line, file=sys.stderr)

    # -- 1M messages -----------------------------------------------------------------------
    async def big(self, res: TargetResult, proc: ServiceProc, backend: Backend, lg: LoadGen) -> None:
        a = self.args
        big = res.big
        await lg.forget()
        say(f"{res.name}: big: 10,000 messages stored and acknowledged")
        await lg.publish_count(10_000, timeout=600)
        await lg.ack()
        await wait_drain(backend, 0, a.drain_timeout)
        big["rss_10k"] = proc.rss()
        await lg.forget()
        say(f"{res.name}: big: filling the store with {a.big_count:,} messages")
        fill = await lg.publish_count(a.big_count, timeout=6 * 3600)
        big["fill"] = fill
        big["stored_full"] = await backend.count()
        big["rss_full"] = proc.rss()
        say(f"{res.name}: big: filled at {fill.rate:,.0f} msg/s; publish with the store full")
        full = await lg.publish(a.duration, a.warmup)
        big["publish_full"] = full
        say(f"{res.name}: big: {full.rate:,.0f} msg/s with {left_text(big['stored_full'])} stored; "
            "acknowledging everything")
        chunk = 20_000
        t0 = time.monotonic()
        acked = 0
        while True:
            before = await backend.count()
            part = await lg.ack(per_proc_limit=max(1, chunk // a.procs))
            if part.total == 0:
                break
            acked += part.total
            if before is not None:
                await wait_drain(backend, max(0, before - part.total), a.drain_timeout, stall=10)
        _, left = await wait_drain(backend, 0, a.drain_timeout)
        big["ack_rate"] = acked / (time.monotonic() - t0)
        big["left"] = left
        await asyncio.sleep(2)
        big["rss_acked"] = proc.rss()
        say(f"{res.name}: big: RSS after 10k {mb(big['rss_10k'])} MB, with {a.big_count:,} stored "
            f"{mb(big['rss_full'])} MB, after acknowledging them {mb(big['rss_acked'])} MB (left {left_text(left)})")

    # -- report ----------------------------------------------------------------------------
    def report(self, command: str) -> Report:
        a = self.args
        settings = (f"{a.concurrency} calls in flight over {a.channels} gRPC connections from {a.procs} "
                    f"load-generator processes; {a.payload}-byte payloads, QoS 1, {a.topics} topics; "
                    f"{a.warmup:.0f} s warm-up + {a.duration:.0f} s per publish phase; server workers {a.workers}"
                    + (f" pinned to CPU {','.join(map(str, a.server_cpu_set))}, load generators and stand-in to CPU "
                       f"{','.join(map(str, a.gen_cpu_set))} (databases unpinned); " if a.server_cpu_set else "; ")
                    +
                    f"service batch_size {a.batch_size}, batch_time {a.batch_time} ms; replay {a.replay:,} messages")
        rep = Report(command=command, date=dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
                     machine=f"{machine()}; load average {self.load_before} before the run, {loadavg()} after "
                             "(anything else running on the 2 cores skews every figure)",
                     settings=settings, revision=self.revision, skipped=list(self.skipped))
        noop = self.noop
        pub_ceiling = noop.publish.rate if noop and noop.publish else None
        ack_ceiling = noop.ack.rate if noop and noop.ack else None
        if noop is not None:
            rep.rows += self._rows(noop, pub_ceiling, ack_ceiling)
            if noop.error:
                rep.skipped.append(f"no-op: failed: {noop.error}")
        for res in self.results:
            rep.rows += self._rows(res, pub_ceiling, ack_ceiling)
            if res.error:
                rep.skipped.append(f"{res.name}: failed: {res.error}")
        rep.verdicts = self._verdicts(noop)
        for res in ([noop] if noop else []) + self.results:
            if res.profile:
                rep.profile += [f"## {res.name}", *res.profile]
        return rep

    def _rows(self, res: TargetResult, pub_ceiling: float | None, ack_ceiling: float | None) -> list[Row]:
        rows: list[Row] = []
        t = res.name if res.name == "no-op" else f"service/{res.name}"
        pub = res.publish
        if pub is not None:
            notes = [f"server CPU {100 * (res.publish_cpu_share or 0):.0f}% of a core",
                     f"loadgen CPU {pub.gen_cpu_s / (self.args.duration + self.args.warmup):.2f} cores"]
            if res.foreign_cores is not None:
                notes.append(f"other processes {res.foreign_cores:.2f} cores")
            if res.stored_after_publish is not None:
                notes.append(f"stored {res.stored_after_publish:,} of {pub.total:,} answered")
            if res.backend_per_msg:
                notes.append(_per_text("message", res.backend_per_msg))
            if pub.errors:
                notes.append(f"{pub.errors} errors ({pub.error_sample[:80]})")
            if res.busy_warning:
                notes.append(res.busy_warning)
            rows.append(Row(t, "OnMessagePublish", pub.rate, _ratio(pub.rate, pub_ceiling), pub.latency.p50,
                            pub.latency.p99, pub.latency.p999, res.publish_cpu_us,
                            f"{mb(res.rss_idle)} → {mb(res.rss_publish)} (peak {mb(res.rss_peak)})", "; ".join(notes)))
        ack = res.ack
        if ack is not None:
            notes = [f"{ack.total:,} acks"]
            if res.name != "no-op":
                if res.drain_s is not None:
                    notes.append(f"store empty {res.drain_s:.1f} s after the first ack "
                                 f"(= {ack.total / res.drain_s:,.0f} deletes/s)")
                else:
                    notes.append(f"store NOT empty: {left_text(res.left_after_drain)} left")
            if ack.errors:
                notes.append(f"{ack.errors} errors")
            if res.backend_per_ack:
                notes.append(_per_text("ack", res.backend_per_ack))
            rows.append(Row(t, "OnMessageAcked", ack.rate, _ratio(ack.rate, ack_ceiling), ack.latency.p50,
                            ack.latency.p99, ack.latency.p999, res.ack_cpu_us, f"{mb(res.rss_ack)}", "; ".join(notes)))
        if res.probe is not None:
            pw = res.probe_wire
            shown = pw or res.probe
            rows.append(Row(t, "sequential replay-like publish, 1 in flight (p = server answer on the wire)",
                            1000 / res.probe.p50, None, shown.p50, shown.p99, shown.p999, None, "",
                            f"msg/s = 1 / client round trip p50 {res.probe.p50:.3f} ms (p99 {res.probe.p99:.3f}): "
                            "the stand-in's floor for a replay"
                            + ("" if pw else "; p columns = client round trip (no tcpdump)")))
        rp = res.replay
        if rp is not None:
            shown = rp.wire or rp.answer
            notes = [f"time to last delivery {rp.last_s:.2f} s (first {1e3 * rp.first_s:.0f} ms)",
                     f"stand-in round trip p50 {rp.answer.p50:.3f} ms p99 {rp.answer.p99:.3f} ms"
                     + ("" if rp.wire else f"; p columns = round trip ({rp.wire_note})"),
                     f"{rp.bulk_calls} publish/bulk calls",
                     "service-bound ceiling " + ("-" if rp.projected is None else f"{rp.projected:,.0f} msg/s")
                     + " (N / (time between bulk calls + Σ service answer times on the wire))",
                     f"in order {'yes' if rp.in_order else 'NO'}",
                     f"delivered {rp.delivered:,}/{rp.n:,}" + ("" if rp.complete else " (INCOMPLETE)"),
                     f"duplicates {rp.duplicates}", f"store empty after acks: {rp.empty_after_acks}",
                     f"SUBACK-blocking hook {rp.subscribe_ms:.1f} ms"]
            rows.append(Row(t, f"replay {rp.n:,} (p = server answer to the replay publishes, on the wire)",
                            rp.rate, None, shown.p50, shown.p99, shown.p999, rp.cpu_us, mb(res.rss_replay),
                            "; ".join(notes)))
        big = res.big
        if big.get("publish_full") is not None:
            full: PhaseResult = big["publish_full"]
            fill: PhaseResult = big["fill"]
            rows.append(Row(t, f"OnMessagePublish, {left_text(big.get('stored_full'))} stored", full.rate,
                            _ratio(full.rate, pub_ceiling), full.latency.p50, full.latency.p99,
                            full.latency.p999, None, f"{mb(big.get('rss_full'))}",
                            f"= {pct(_ratio(full.rate, pub.rate if pub else None))} of the empty-store rate; "
                            f"the fill of {fill.total:,} ran at {fill.rate:,.0f} msg/s"))
            rows.append(Row(t, f"ack all {self.args.big_count:,} (RSS: after 10k stored+acked → after "
                               f"{self.args.big_count:,} stored+acked)", big.get("ack_rate"), None,
                            None, None, None, None, f"{mb(big.get('rss_10k'))} → {mb(big.get('rss_acked'))}",
                            f"msg/s = acks until the store is empty; left in store {left_text(big.get('left'))}"))
        if res.raw is not None:
            svc = pub.rate if pub else None
            rows.append(Row(f"raw {res.name}", f"write batches of {self.args.batch_size}", res.raw.write_rate,
                            None, None, None, None, None, "",
                            f"service publish = {pct(_ratio(svc, res.raw.write_rate))} of it; {res.raw.note}"))
            rows.append(Row(f"raw {res.name}", f"delete batches of {self.args.batch_size}", res.raw.delete_rate,
                            None, None, None, None, None, "", f"{res.raw.messages:,} messages"))
        elif res.raw_error:
            rows.append(Row(f"raw {res.name}", "ceiling", notes=f"failed: {res.raw_error}"))
        c = res.counters
        bad = {k: v for k, v in c.items() if k.startswith(_TROUBLE_COUNTERS) and v}
        if bad and rows:
            rows[0].notes += "; service counters: " + ", ".join(f"{k} {v:,.0f}" for k, v in bad.items())
        trips, ops = c.get("store_write_batch_size_count", 0), c.get("store_write_batch_size_sum", 0)
        if trips and rows:
            rows[0].notes += (f"; writer over the whole run: {ops:,.0f} ops in {trips:,.0f} store round trips "
                              f"(≈ {ops / trips:.1f} per round trip)")
        return rows

    def _verdicts(self, noop: TargetResult | None) -> list[str]:
        out = []
        a = self.args
        if noop is None or noop.publish is None:
            return ["no no-op ceiling measured: ratios unavailable"]
        for res in self.results:
            pub = res.publish
            if pub is None:
                continue
            ratio = pub.rate / noop.publish.rate
            need = 0.8 if res.name == "redis" else 0.5
            out.append(f"{res.name} publish throughput {100 * ratio:.0f}% of no-op (target ≥ {100 * need:.0f}%): "
                       f"{'met' if ratio >= need else 'MISSED'}")
            if res.name == "redis":
                limit = noop.publish.latency.p99 + a.batch_time
                out.append(f"redis publish p99 {pub.latency.p99:.2f} ms (target ≤ no-op p99 "
                           f"{noop.publish.latency.p99:.2f} + batch_time {a.batch_time} = {limit:.2f} ms): "
                           f"{'met' if pub.latency.p99 <= limit else 'MISSED'}")
            rp = res.replay
            if rp is not None:
                shown = rp.wire or rp.answer
                ok_rate = rp.rate >= 4000
                ok_p50 = shown.p50 <= 0.3
                out.append(f"{res.name} replay {rp.rate:,.0f} msg/s (target ≥ 4,000): "
                           f"{'met' if ok_rate else 'MISSED'}; "
                           f"replay publish answer p50 {shown.p50:.3f} ms "
                           f"({'on the wire' if rp.wire else 'client round trip'}; target ≤ 0.3 ms): "
                           f"{'met' if ok_p50 else 'MISSED'}"
                           + ("" if rp.in_order and rp.complete and not rp.duplicates else " — replay NOT correct"))
        return out


def git_revision() -> str:
    """The commit measured (and whether the tree differs from it)."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "exhook", "storage"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head or 'unknown'}" + (" + uncommitted changes in exhook/ or storage/" if dirty else "")


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system  # this process only (its threads: stand-in, samplers)


async def wait_idle(limit: float) -> str:
    """Wait until the rest of the machine is idle (< 0.2 cores over 2 s); '' or a warning."""
    if limit <= 0:
        return ""
    deadline = time.monotonic() + limit
    busy = 0.0
    while True:
        b0, o0 = busy_seconds(), _own_cpu()
        await asyncio.sleep(2.0)
        busy = (busy_seconds() - b0 - (_own_cpu() - o0)) / 2.0
        if busy < 0.2:
            return ""
        if time.monotonic() >= deadline:
            return f"machine still busy ({busy:.1f} cores used by other processes) after waiting {limit:.0f} s"
        say(f"waiting for the machine to be idle: other processes use {busy:.1f} cores")


def _per_text(what: str, per: dict[str, float]) -> str:
    text = ", ".join(f"{v:.2f} {k}" for k, v in per.items())
    trips = per.get("round trips") or per.get("commits")
    return f"backend server per {what}: {text}" + (f" (≈ {1 / trips:.1f} {what}s per write batch)" if trips else "")


def _ratio(value: float | None, ceiling: float | None) -> float | None:
    if value is None or not ceiling or math.isnan(ceiling):
        return None
    return value / ceiling


def left_text(value: int | None) -> str:
    return "?" if value is None else f"{value:,}"


async def amain(args: argparse.Namespace, command: str) -> int:
    if args.gen_cpu_set:
        os.sched_setaffinity(0, args.gen_cpu_set)  # the stand-in and samplers stay off the server's CPU
    bench = Bench(args)
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    if task is not None:
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    started = time.monotonic()
    try:
        await bench.standin.start()
        if not args.no_noop:
            await bench.run_noop()
        for name in args.backends:
            await bench.run_backend(name)
    finally:
        await bench.standin.close()
        remove_workdir(bench.dir)
    rep = bench.report(command)
    text = rep.markdown()
    print(text)
    say(f"done in {time.monotonic() - started:.0f} s")
    if not args.no_write:
        write_benchmarks(Path(args.output), text)
        say(f"wrote the generated section of {args.output}")
    return 0


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    shown = sys.argv[1:] if argv is None else argv
    command = "make bench" + (f" BENCH_ARGS='{shlex.join(shown)}'" if shown else "")
    try:
        sys.exit(asyncio.run(amain(args, command)))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("benchmark interrupted; every process it started was stopped", file=sys.stderr)
        sys.exit(130)
