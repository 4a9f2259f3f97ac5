"""Orchestration of one benchmark run: for each ExHook protocol, the no-op server and the
service on each backend under the same closed-loop loads (publish, mixed publish +
acked, replay, optional profile and 1M-message runs); the raw backend ceilings and
commit costs; the reconnect storm through the EMQX emulator; then the tables and
BENCHMARKS.md. Every process it starts is stopped in a ``finally`` (also on Ctrl-C /
SIGTERM / failure)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import random
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any

from bench import raw as rawmod
from bench import spool_cost
from bench.common import PROTOCOLS, busy_seconds, cpu_seconds, free_port, loadavg, machine
from bench.loadgen import GenConfig, LoadGen, topic_of
from bench.noop import DEFAULT_HOOKS
from bench.profile import Profiler, pyspy, summarize
from bench.replay import ceiling, replay
from bench.report import build_report, write_benchmarks
from bench.results import NOOP, LoadCell, Results, TargetRun
from bench.service import (
    API_KEY,
    API_SECRET,
    BACKENDS,
    ROOT,
    Backend,
    NoopProc,
    ServiceProc,
    SqliteBackend,
    make_backend,
    missing_backend,
    remove_workdir,
    service_hook_specs,
    wait_drain,
    wait_stored,
    workdir,
)
from bench.standin import StandIn
from bench.storm import CONNACK_HOOKS, EmulatorProc, StormResult, fill
from bench.storm import topic as storm_topic

PHASES = ("publish", "mixed", "replay", "raw", "storm")
# the full run (make bench) and --quick; an option given on the command line wins over both
DEFAULTS: dict[str, Any] = {
    "clients": "1,4,32,256", "mixed_clients": "32,256", "duration": 5.0, "warmup": 1.0, "replay": 10_000,
    "storm": "500,2000", "storm_workers": "1,2", "raw_seconds": 5.0, "commit_count": 300, "wait_idle": 30.0,
    "recovery": 10_000,
}
QUICK: dict[str, Any] = {
    "clients": "1,32", "mixed_clients": "32", "duration": 2.0, "warmup": 0.5, "replay": 1_000,
    "storm": "200", "storm_workers": "1", "raw_seconds": 1.0, "commit_count": 50, "wait_idle": 0.0,
    "recovery": 1_000,
}


def _ints(text: str) -> list[int]:
    return sorted({int(v) for v in text.split(",") if v.strip()})


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    full = ", ".join(f"{k.replace('_', '-')} {v}" for k, v in DEFAULTS.items())
    quick = ", ".join(f"{k.replace('_', '-')} {v}" for k, v in QUICK.items())
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                epilog=f"Defaults of the full run: {full}. --quick: {quick}.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--phases", default=",".join(PHASES),
                   help=f"comma-separated phases to run, of {', '.join(PHASES)}")
    p.add_argument("--protocols", default="v3,v2", help="ExHook packages to speak (v2: EMQX 5.0-5.8, v3: 5.9+)")
    p.add_argument("--backends", default=",".join(BACKENDS),
                   help="comma-separated service backends to measure (empty: none)")
    p.add_argument("--no-noop", action="store_true", help="skip the no-op server (no ratios then)")
    p.add_argument("--quick", action="store_true",
                   help="short smoke run for development (smaller sizes, see below); implies --no-write")
    p.add_argument("--clients", default=None, help="publish phase: numbers of closed-loop publishing clients")
    p.add_argument("--mixed-clients", default=None, help="mixed phase: numbers of publisher+subscriber pairs")
    p.add_argument("--duration", type=float, default=None, help="measured seconds of each publish / mixed window")
    p.add_argument("--warmup", type=float, default=None, help="unmeasured seconds before each window")
    p.add_argument("--procs", type=int, default=2, help="load-generator processes")
    p.add_argument("--channels", type=int, default=8, help="gRPC connections (EMQX pool_size)")
    p.add_argument("--payload", type=int, default=300, help="payload bytes")
    p.add_argument("--workers", type=int, default=1,
                   help="server processes in the publish, mixed and replay phases (service --workers, no-op too)")
    p.add_argument("--pin", choices=("auto", "on", "off"), default="auto",
                   help="CPU affinity: the server on the first --server-cpus CPUs, the load generators, the "
                        "emulator and this process on the others (auto: on with at least 2 CPUs); the database "
                        "servers are not pinned")
    p.add_argument("--server-cpus", type=int, default=1, help="CPUs given to the server when pinned")
    p.add_argument("--batch-size", type=int, default=100, help="service batch_size")
    p.add_argument("--batch-time", type=int, default=10, help="service batch_time (ms)")
    p.add_argument("--replay", type=int, default=None, help="messages replayed to a new subscriber")
    p.add_argument("--replay-batch", type=int, default=100,
                   help="items per publish/bulk of the no-op ceiling (the service's replay_batch_size)")
    p.add_argument("--storm", default=None, help="reconnect storm: numbers of clients (e.g. 500,2000,10000)")
    p.add_argument("--storm-workers", default=None, help="reconnect storm: server worker counts")
    p.add_argument("--storm-protocol", default="v3", choices=PROTOCOLS, help="reconnect storm: ExHook package")
    p.add_argument("--storm-timeout", type=float, default=0.0,
                   help="reconnect storm: give up after this many seconds (0: 30 + clients / 40)")
    p.add_argument("--storm-stall", type=float, default=15.0,
                   help="reconnect storm: give up when no client got its replay for this long")
    p.add_argument("--storm-settle", type=float, default=2.0,
                   help="reconnect storm: seconds to wait after the last replay (late duplicates)")
    p.add_argument("--storm-net-delay", type=float, default=0.001, help="emulator: one-way client latency (s)")
    p.add_argument("--request-timeout", type=float, default=5.0, help="emulator: exhook request_timeout (s)")
    p.add_argument("--raw-seconds", type=float, default=None, help="seconds of each raw backend ceiling")
    p.add_argument("--commit-count", type=int, default=None,
                   help="single-row commits timed per backend (and single-message spool appends)")
    p.add_argument("--recovery", type=int, default=None,
                   help="messages spooled, then drained into each store (outage recovery; phase raw)")
    p.add_argument("--ack-max-seconds", type=float, default=120.0, help="cap on each ack phase of --big")
    p.add_argument("--drain-timeout", type=float, default=60.0,
                   help="wait at most this long for the store to return to its size after acks")
    p.add_argument("--sqlite-synchronous", default="FULL", help="PRAGMA synchronous of the raw SQLite ceiling")
    p.add_argument("--profile", metavar="DIR", default=None,
                   help="also profile each server with py-spy (extra, unmeasured phases); output in DIR")
    p.add_argument("--profile-native", action="store_true", help="py-spy --native (C frames too)")
    p.add_argument("--big", action="store_true",
                   help="also (first protocol only): RSS after 10k vs 1M stored+acked, publish throughput with 1M "
                        "stored (long)")
    p.add_argument("--big-count", type=int, default=1_000_000, help="messages of the --big fill")
    p.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"), help="file whose generated section is written")
    p.add_argument("--no-write", action="store_true", help="print the tables only")
    p.add_argument("--keep-workdir", action="store_true",
                   help="keep the servers' configs and logs (their directory is printed at the end)")
    p.add_argument("--wait-idle", type=float, default=None,
                   help="before each server, wait up to this many seconds for the machine to be idle "
                        "(other processes < 0.2 cores); 0: do not wait")
    args = p.parse_args(argv)
    for key, value in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, QUICK[key] if args.quick else value)
    if args.quick:
        args.no_write = True
    args.phases = _names(args.phases)
    args.protocols = _names(args.protocols)
    args.backends = _names(args.backends)
    args.clients, args.mixed_clients = _ints(args.clients), _ints(args.mixed_clients)
    args.storm, args.storm_workers = _ints(args.storm), _ints(args.storm_workers)
    for name, allowed, values in (("phase", PHASES, args.phases), ("protocol", PROTOCOLS, args.protocols),
                                  ("backend", BACKENDS, args.backends)):
        for v in values:
            if v not in allowed:
                p.error(f"unknown {name} {v!r} (expected {', '.join(allowed)})")
    cpus = sorted(os.sched_getaffinity(0))
    pin = args.pin == "on" or (args.pin == "auto" and len(cpus) >= 2)
    if pin and len(cpus) > args.server_cpus >= 1:
        args.server_cpu_set = tuple(cpus[:args.server_cpus])
        args.gen_cpu_set = tuple(cpus[args.server_cpus:])
    else:
        args.server_cpu_set = args.gen_cpu_set = ()
    if args.procs < 1 or args.channels < 1 or min(args.clients + args.mixed_clients, default=1) < 1:
        p.error("need procs >= 1, channels >= 1 and at least one client")
    return args


def say(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


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


class CpuWindow:
    """Server CPU, the generators' CPU and everything else the machine did over a phase."""

    def __init__(self, proc: ServiceProc) -> None:
        self.proc = proc
        self.t0 = time.monotonic()
        self.cpu0, self.busy0, self.own0 = proc.cpu(), busy_seconds(), _own_cpu()

    def close(self, gen_cpu_s: float) -> tuple[float, float, float, float]:
        """(server CPU s, server cores, generator cores, other processes' cores)."""
        wall = max(time.monotonic() - self.t0, 1e-9)
        cpu = self.proc.cpu() - self.cpu0
        other = busy_seconds() - self.busy0 - cpu - gen_cpu_s - (_own_cpu() - self.own0)
        return cpu, cpu / wall, gen_cpu_s / wall, max(0.0, other / wall)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tag = f"{os.getpid() % 10000:04d}{int(time.time()) % 100000:05d}"
        self.dir = workdir()
        self.standin = StandIn()
        targets = ([] if args.no_noop else [NOOP]) + list(args.backends)
        self.res = Results(args.protocols, targets, args.clients, args.mixed_clients, args.storm,
                           args.storm_workers)
        self.hooks: list[tuple[str, list[str]]] = list(DEFAULT_HOOKS)
        self.load_before = loadavg()
        self.revision = git_revision()

    @property
    def load_clients(self) -> int:
        return max(self.args.clients + self.args.mixed_clients, default=1)

    def gen_config(self, port: int, protocol: str) -> GenConfig:
        a = self.args
        return GenConfig(port=port, protocol=protocol, procs=a.procs, channels=a.channels,
                         clients=self.load_clients, payload_size=a.payload, run_tag=random.randrange(1 << 16),
                         cpus=a.gen_cpu_set)

    def topics(self) -> list[str]:
        return [topic_of(c) for c in range(self.load_clients)]

    # -- the hook set ----------------------------------------------------------------------
    async def learn_hooks(self) -> None:
        """The no-op registers what the service registers (asked from a short-lived instance)."""
        if missing_backend("sqlite") is not None:
            self.res.hook_note = "no-op hooks: its default set (the service could not be started to ask it)"
            return
        try:
            self.hooks = await service_hook_specs(self.dir)
            names = ", ".join(n for n, _ in self.hooks)
            self.res.hook_note = f"the no-op registers the service's own hook set ({names})"
        except Exception as exc:
            self.res.hook_note = f"no-op hooks: its default set (asking the service failed: {exc})"
        say(self.res.hook_note)

    # -- one server under load -------------------------------------------------------------
    async def make_backend(self, name: str, tag: str) -> Backend | None:
        reason = missing_backend(name)
        if reason is None:
            backend = make_backend(name, tag, self.dir, self.topics())
            try:
                await backend.setup()
                return backend
            except Exception as exc:
                reason = f"backend server unreachable: {type(exc).__name__}: {exc}"
        if not any(s.startswith(f"{name}:") for s in self.res.skipped):
            self.res.skipped.append(f"{name}: {reason}")
        say(f"SKIP {name}: {reason}")
        return None

    def server(self, backend: Backend | None, workers: int, api_port: int, name: str) -> ServiceProc:
        a = self.args
        if backend is None:
            return NoopProc(workers, self.dir, a.server_cpu_set, hooks=self.hooks)
        # the service is told the emulator's timeout, as an operator tells it EMQX's
        return ServiceProc(backend, workers, a.batch_size, a.batch_time, api_port, self.dir, a.server_cpu_set,
                           name=name, hook_timeout_s=a.request_timeout)

    async def run_target(self, protocol: str, target: str) -> None:
        a = self.args
        backend = None
        if target != NOOP:
            backend = await self.make_backend(target, f"{self.tag}{protocol}")
            if backend is None:
                return
        run = TargetRun(protocol, target)
        self.res.runs.append(run)
        proc = self.server(backend, a.workers, self.standin.port, f"{target}-{protocol}")
        try:
            run.busy_warning = await wait_idle(a.wait_idle)
            say(f"{target}/{protocol}: starting the server (workers {a.workers})")
            proc.start()
            run.hooks = await proc.wait_ready(protocol)
            run.rss_idle = proc.rss()
            with RssSampler(proc) as sampler, LoadGen(self.gen_config(proc.port, protocol)) as lg:
                await lg.ready()
                await self.load_phases(run, proc, backend, lg)
            run.rss_peak, run.rss_end = sampler.peak, proc.rss()
        except Exception as exc:
            run.error = f"{type(exc).__name__}: {exc}"
            say(f"{target}/{protocol} failed: {run.error}")
        finally:
            await self.standin.disconnect()
            run.counters = proc.counters()
            proc.stop()
            run.log_errors = proc.log_lines("level=error") + proc.log_lines("level=critical")
            if run.log_errors:
                say(f"{target}/{protocol}: the server logged {len(run.log_errors)} errors, first: "
                    f"{run.log_errors[0][:300]}")
            if backend is not None:
                with contextlib.suppress(Exception):
                    await backend.cleanup()

    async def load_phases(self, run: TargetRun, proc: ServiceProc, backend: Backend | None, lg: LoadGen) -> None:
        a = self.args
        if "publish" in a.phases:
            for n in a.clients:
                await self.publish_cell(run, proc, backend, lg, n)
        if "mixed" in a.phases:
            for n in a.mixed_clients:
                await self.mixed_cell(run, proc, backend, lg, n)
        if "replay" in a.phases and a.replay > 0:
            await self.replay_phase(run, proc, backend)
        if a.profile:
            await self.profile(run, proc, backend, lg)
        if a.big and backend is not None and run.protocol == a.protocols[0]:
            await self.big(run, proc, backend, lg)

    async def publish_cell(self, run: TargetRun, proc: ServiceProc, backend: Backend | None, lg: LoadGen,
                           n: int) -> None:
        a = self.args
        window = CpuWindow(proc)
        ph = await lg.publish(n, a.duration, a.warmup, record_ids=False)
        cpu, cores, gen, other = window.close(ph.gen_cpu_s)
        cell = LoadCell(run.protocol, run.target, n, ph, cpu / max(ph.total, 1) * 1e6, cores, gen, other)
        if backend is not None:
            cell.stored_after = await backend.count()
        self.res.publish[(run.protocol, run.target, n)] = cell
        say(f"{run.target}/{run.protocol}: publish N={n}: {ph.rate:,.0f} msg/s, p50 {ph.latency.p50:.2f} ms, "
            f"p99 {ph.latency.p99:.2f} ms, server {cell.cpu_us:.0f} us CPU/call ({cores:.2f} cores), "
            f"errors {ph.errors} {ph.error_sample}")

    async def mixed_cell(self, run: TargetRun, proc: ServiceProc, backend: Backend | None, lg: LoadGen,
                         n: int) -> None:
        a = self.args
        base = await backend.count() if backend is not None else None
        window = CpuWindow(proc)
        ph = await lg.mixed(n, a.duration, a.warmup)
        drained = ""
        if backend is not None and base is not None:
            t0 = time.monotonic()
            reached, left = await wait_drain(backend, base, a.drain_timeout)
            drained = (f"store back to its size {ph.drain_s + time.monotonic() - t0:.1f} s after the window"
                       if reached else f"store NOT back to its size: {'?' if left is None else left - base} extra")
        cpu, cores, gen, other = window.close(ph.gen_cpu_s)
        cell = LoadCell(run.protocol, run.target, n, ph, cpu / max(ph.total, 1) * 1e6, cores, gen, other,
                        drained=drained)
        self.res.mixed[(run.protocol, run.target, n)] = cell
        say(f"{run.target}/{run.protocol}: mixed N={n}: {ph.rate:,.0f} msg/s acked ({ph.publish_rate:,.0f} "
            f"published), publish p99 {ph.latency.p99:.2f} ms, ack p99 {ph.ack_latency.p99:.2f} ms, "
            f"server {cell.cpu_us:.0f} us CPU/msg; backlog {ph.backlog}; {drained}")

    async def replay_phase(self, run: TargetRun, proc: ServiceProc, backend: Backend | None,
                           profile: str | None = None) -> None:
        a = self.args
        topic = f"bench/replay/{self.tag}" + (f"-{profile}" if profile else "")
        if backend is None:
            if profile:
                return
            say(f"no-op/{run.protocol}: sequential replay ceiling, {a.replay:,} messages through publish/bulk")
            ceil = await ceiling(self.standin, proc, run.protocol, a.replay, a.replay_batch, topic, a.payload)
            self.res.ceilings[run.protocol] = ceil
            say(f"no-op/{run.protocol}: ceiling {ceil.rate:,.0f} msg/s, {ceil.cpu_us:.0f} us CPU/call")
            return
        prof = (Path(a.profile), f"{run.target}-{run.protocol}-replay", a.profile_native) if profile else None
        result, lines = await replay(self.standin, proc, backend, run.protocol, a.replay, topic, a.channels,
                                     a.payload, a.drain_timeout, prof)
        if profile:
            run.profile += lines
        else:
            self.res.replays[(run.protocol, run.target)] = result

    # -- profile ---------------------------------------------------------------------------
    async def profile(self, run: TargetRun, proc: ServiceProc, backend: Backend | None, lg: LoadGen) -> None:
        """Extra, unmeasured phases under py-spy: publish at the most clients, mixed, replay."""
        a = self.args
        out = Path(a.profile)
        if pyspy() is None:
            run.profile = ["py-spy is not installed: .venv/bin/pip install py-spy"]
            return
        name = f"{run.target}-{run.protocol}"
        for phase in ("publish", "mixed"):
            n = max(a.clients if phase == "publish" else a.mixed_clients, default=32)
            say(f"{name}: py-spy profile of the {phase} path, N={n}")
            prof = Profiler(proc.pid, out, f"{name}-{phase}", subprocesses=proc.workers > 1, native=a.profile_native)
            try:
                await asyncio.sleep(1.0)  # py-spy attaches
                cpu0 = proc.cpu()
                if phase == "publish":
                    result = await lg.publish(n, a.duration, 0.5, record_ids=False)
                else:
                    result = await lg.mixed(n, a.duration, 0.5)
                cpu_us = (proc.cpu() - cpu0) / max(result.total, 1) * 1e6
            finally:
                prof.stop()
            run.profile += [*summarize(prof.raw, result.total, cpu_us), f"  flame graph: {prof.svg}", ""]
        if a.replay > 0:
            say(f"{name}: py-spy profile of a replay")
            await self.replay_phase(run, proc, backend, profile="prof")
        (out / f"{name}-summary.txt").write_text("\n".join(run.profile) + "\n")
        for line in run.profile:
            print(line, file=sys.stderr)

    # -- 1M messages -----------------------------------------------------------------------
    async def big(self, run: TargetRun, proc: ServiceProc, backend: Backend, lg: LoadGen) -> None:
        a = self.args
        big = run.big
        n = max(a.clients, default=256)
        base = await backend.count() or 0
        await lg.forget()
        say(f"{run.target}: big: 10,000 messages stored and acknowledged ({n} clients)")
        await lg.publish_count(n, 10_000, timeout=600)
        await lg.ack(n)
        await wait_drain(backend, base, a.drain_timeout)
        big["rss_10k"] = proc.rss()
        await lg.forget()
        say(f"{run.target}: big: filling the store with {a.big_count:,} messages")
        fill_res = await lg.publish_count(n, a.big_count, timeout=6 * 3600)
        big["fill"] = fill_res
        big["stored_full"] = await wait_stored(backend, base + a.big_count, 60)
        big["rss_full"] = proc.rss()
        say(f"{run.target}: big: filled at {fill_res.rate:,.0f} msg/s; publish with the store full")
        full = await lg.publish(n, a.duration, a.warmup)  # recorded: acknowledged below with the fill
        big["publish_full"] = full
        big["publish_empty"] = self.res.publish.get((run.protocol, run.target, n))
        stored = big["stored_full"]
        say(f"{run.target}: big: {full.rate:,.0f} msg/s with {'?' if stored is None else f'{stored:,}'} stored; "
            "acknowledging everything")
        chunk = 20_000
        t0 = time.monotonic()
        acked = 0
        while True:
            before = await backend.count()
            part = await lg.ack(n, per_proc_limit=max(1, chunk // lg.cfg.procs), max_seconds=a.ack_max_seconds)
            if part.total == 0:
                break
            acked += part.total
            if before is not None:
                await wait_drain(backend, max(base, before - part.total), a.drain_timeout, stall=10)
        _, left = await wait_drain(backend, base, a.drain_timeout)
        big["ack_rate"] = acked / (time.monotonic() - t0)
        big["left"] = None if left is None else left - base
        await asyncio.sleep(2)
        big["rss_acked"] = proc.rss()

    # -- raw backend ceilings and commit costs ---------------------------------------------
    async def raw_phase(self, name: str) -> None:
        a = self.args
        backend = await self.make_backend(name, f"{self.tag}raw")
        if backend is None:
            return
        try:
            await wait_idle(min(30.0, a.wait_idle))
            await self.create_schema(backend)
            topics = self.topics()
            say(f"{name}: raw backend ceiling, {a.raw_seconds:g} s, and {a.commit_count} single-message commits")
            try:
                if name == "redis":
                    tag = f"{self.tag}raw"
                    self.res.raw[name] = await rawmod.redis_ceiling(a.raw_seconds, a.batch_size, a.payload, topics, tag)
                    self.res.commits[name] = await rawmod.redis_commit_cost(a.commit_count, a.payload, tag)
                elif name == "mysql":
                    db = backend.database  # type: ignore[attr-defined]
                    self.res.raw[name] = await rawmod.mysql_ceiling(a.raw_seconds, a.batch_size, a.payload,
                                                                    topics, db)
                    self.res.commits[name] = await rawmod.mysql_commit_cost(db, a.commit_count, a.payload)
                else:
                    assert isinstance(backend, SqliteBackend)
                    self.res.raw[name] = await rawmod.sqlite_ceiling(a.raw_seconds, a.batch_size, a.payload,
                                                                     topics, self.dir, backend.path,
                                                                     a.sqlite_synchronous)
                    self.res.commits[name] = await rawmod.sqlite_commit_cost(self.dir, backend.path, a.commit_count,
                                                                             a.payload)
            except Exception as exc:
                self.res.skipped.append(f"raw {name}: failed: {type(exc).__name__}: {exc}")
                say(f"{name}: raw ceiling failed: {exc}")
            await self.recovery_cell(name, backend)
        finally:
            with contextlib.suppress(Exception):
                await backend.cleanup()

    async def spool_phase(self) -> None:
        a = self.args
        say(f"spool: {a.commit_count} single-message appends, then batches of 100")
        try:
            self.res.spool = await spool_cost.append_cost(self.dir, a.commit_count, a.payload, self.topics())
        except Exception as exc:
            self.res.skipped.append(f"spool append: failed: {type(exc).__name__}: {exc}")

    async def recovery_cell(self, name: str, backend: Backend) -> None:
        """A store outage's backlog: the spool drained into ``name`` by the service's own writer."""
        a = self.args
        say(f"{name}: recovery, {a.recovery:,} spooled messages drained into the store")
        try:
            self.res.recoveries[name] = await spool_cost.recovery(
                self.dir, backend.hocon(a.batch_size, a.batch_time), a.recovery, a.payload, self.topics(),
                a.batch_size)
        except Exception as exc:
            self.res.skipped.append(f"recovery {name}: failed: {type(exc).__name__}: {exc}")

    async def create_schema(self, backend: Backend) -> None:
        """Let the service create its tables (SQL backends), so the raw figures use its schema."""
        if backend.name == "redis":
            return
        proc = ServiceProc(backend, 1, 1, 0, self.standin.port, self.dir, name=f"schema-{backend.name}")
        try:
            proc.start()
            await proc.wait_ready("v3", timeout=30)
        except Exception as exc:
            say(f"{backend.name}: the service did not create its schema ({exc}); raw figures use their own")
        finally:
            proc.stop()

    # -- reconnect storm -------------------------------------------------------------------
    async def storm_cell(self, n: int, workers: int, target: str) -> None:
        a = self.args
        res = StormResult(n, workers, target)
        backend = None
        if target != NOOP:
            backend = await self.make_backend(target, f"{self.tag}s{n}w{workers}")
            if backend is None:
                return
            backend.add_topics([storm_topic(i) for i in range(n)])
        self.res.storms[(n, workers, target)] = res
        rest_port = free_port()
        proc = self.server(backend, workers, rest_port, f"storm-{target}-{n}-{workers}")
        emu: EmulatorProc | None = None
        timeout = a.storm_timeout or 30 + n / 40
        try:
            await wait_idle(a.wait_idle)
            say(f"storm {target}: {n:,} clients, {workers} worker(s): starting")
            proc.start()
            await proc.wait_ready(a.storm_protocol)
            emu = EmulatorProc({
                "target": f"127.0.0.1:{proc.port}", "protocol": a.storm_protocol, "api_key": API_KEY,
                "api_secret": API_SECRET, "rest_port": rest_port, "pool_size": a.channels,
                "request_timeout": a.request_timeout, "net_delay": a.storm_net_delay, "n": n,
                "payload": a.payload, "cpus": a.gen_cpu_set})
            res.hooks = [h for h in await emu.ready() if h in CONNACK_HOOKS]
            prep = await emu.prepare(timeout=120 + n / 20)
            res.prepare_s = prep["seconds"]
            if prep["error_count"]:
                res.error = f"preparation: {prep['error_count']} failures, e.g. {prep['errors'][0]}"
            if backend is not None:
                res.stored_before = await wait_stored(backend, n, 60)
            say(f"storm {target}: prepared in {res.prepare_s:.1f} s (stored "
                f"{'-' if res.stored_before is None else res.stored_before}); all {n:,} reconnect now")
            # the preparation's own background work (its subscribe jobs, held back while the
            # clients connected, replay to clients that left) must not run into the storm
            if quiet := await wait_server_quiet(proc, 30.0):
                say(f"storm {target}: {quiet}")
            window = CpuWindow(proc)
            emu_pid = emu.proc.pid or 0
            emu_cpu0 = cpu_seconds(emu_pid)
            answer = await emu.storm(timeout, a.storm_stall, a.storm_settle, replays=backend is not None)
            emu_cpu = cpu_seconds(emu_pid) - emu_cpu0
            res.server_cpu_s, _, _, res.other_cores = window.close(emu_cpu)
            fill(res, answer)
            if backend is not None:
                res.stored_after = await backend.count()
            say(f"storm {target}: restored {res.restored:,}/{n:,}, replayed {res.replayed:,}, "
                f"complete {'-' if res.complete_s is None else f'{res.complete_s:.1f} s'}, CONNACK hooks p50 "
                f"{res.connack_hold.p50:.1f} ms p99 {res.connack_hold.p99:.1f} ms, failed calls "
                f"{res.failed_calls}, duplicates {res.duplicates}, server CPU {res.server_cpu_s:.1f} s, "
                f"emulator CPU {res.emulator_cpu_s:.1f} s over {res.wall_s:.1f} s")
        except Exception as exc:
            res.error = f"{type(exc).__name__}: {exc}"
            say(f"storm {target} ({n}, {workers} workers) failed: {res.error}")
        finally:
            if emu is not None:
                emu.stop()
            proc.stop()
            errors = proc.log_lines("level=error") + proc.log_lines("level=critical")
            if errors:
                res.error = (res.error + "; " if res.error else "") + \
                    f"the server logged {len(errors)} errors, first: {errors[0][:200]}"
            if backend is not None:
                with contextlib.suppress(Exception):
                    await backend.cleanup()

    # -- the whole run ---------------------------------------------------------------------
    async def run(self) -> None:
        a = self.args
        load = any(p in a.phases for p in ("publish", "mixed", "replay")) or a.profile or a.big
        if self.res.targets and (NOOP in self.res.targets) and (load or "storm" in a.phases):
            await self.learn_hooks()
        if load:
            for protocol in a.protocols:
                for target in self.res.targets:
                    await self.run_target(protocol, target)
        if "raw" in a.phases:
            await self.spool_phase()
            for name in a.backends:
                await self.raw_phase(name)
        if "storm" in a.phases:
            for n in a.storm:
                for workers in a.storm_workers:
                    for target in self.res.targets:
                        await self.storm_cell(n, workers, target)

    def settings(self) -> str:
        a = self.args
        pin = (f"server pinned to CPU {','.join(map(str, a.server_cpu_set))}, load generators, emulator and "
               f"stand-in to CPU {','.join(map(str, a.gen_cpu_set))} (databases unpinned)"
               if a.server_cpu_set else "nothing pinned")
        return (f"phases {','.join(a.phases)}; protocols {','.join(a.protocols)}; closed-loop clients "
                f"{','.join(map(str, a.clients))} (publish), {','.join(map(str, a.mixed_clients))} (mixed), one "
                f"call in flight each, over {a.channels} gRPC connections routed by clientid, from {a.procs} "
                f"load-generator processes; {a.payload}-byte payloads, QoS 1; {a.warmup:g} s warm-up + "
                f"{a.duration:g} s per window; server workers {a.workers}; {pin}; service batch_size "
                f"{a.batch_size}, batch_time {a.batch_time} ms; replay {a.replay:,} messages; storm "
                f"{','.join(map(str, a.storm)) or '-'} clients with {','.join(map(str, a.storm_workers))} "
                f"worker(s), ExHook {a.storm_protocol}, request_timeout {a.request_timeout:g} s, pool_size "
                f"{a.channels}")


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


async def wait_server_quiet(proc: ServiceProc, limit: float) -> str:
    """Wait until the server uses under 0.05 cores over 0.5 s, at least 1 s; '' or a warning."""
    deadline = time.monotonic() + limit
    await asyncio.sleep(0.5)
    while True:
        cpu0 = proc.cpu()
        await asyncio.sleep(0.5)
        used = (proc.cpu() - cpu0) / 0.5
        if used < 0.05:
            return ""
        if time.monotonic() >= deadline:
            return f"the server still uses {used:.2f} cores after the preparation ({limit:.0f} s)"


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
        await bench.run()
    finally:
        await bench.standin.close()
        if args.keep_workdir:
            say(f"kept the servers' configs and logs in {bench.dir}")
        else:
            remove_workdir(bench.dir)
    elapsed = time.monotonic() - started
    text = build_report(bench.res, args, command=command,
                        date=dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
                        machine=f"{machine()}; load average {bench.load_before} before the run, {loadavg()} after "
                                "(anything else running on the 2 cores skews every figure)",
                        settings=bench.settings(), revision=bench.revision, elapsed_s=elapsed)
    print(text)
    say(f"done in {elapsed:.0f} s")
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
