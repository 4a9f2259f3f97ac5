"""The parent of N worker processes sharing the gRPC port.

gRPC sets SO_REUSEPORT, so the kernel spreads the broker's connections over the
workers, each with its own pools and writer. The parent owns the HTTP port: its
``/metrics`` adds up every worker's metrics (prometheus-client's multiprocess
mode: each worker writes its values to files in a private directory), and its
``/readyz`` is ready while every worker is alive and all its readiness conditions
are ok (each worker sends its conditions, with their reasons, over a pipe).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import tempfile
from collections.abc import Callable, Collection, Sequence
from dataclasses import replace
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from exhook.config import Config, HostPort, backend_name
from exhook.health import Conditions, failing_reasons
from exhook.listen import port_problem
from exhook.ops_http import OpsHttpServer
from exhook.process_metrics import ProcessesCollector

log = logging.getLogger("exhook")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class WorkersReadiness:
    """Readiness of the whole set. Each worker sends its readiness conditions over a
    pipe whenever they change, so ``/readyz`` can say which worker is not ready and why
    (and leave conditions out with ``?exclude=``, as a single process does)."""

    def __init__(self, procs: Sequence[BaseProcess], reports: Sequence[Connection]) -> None:
        self._procs = procs
        self._reports = reports
        self._states: dict[int, Conditions] = {}

    def listen(self) -> None:
        loop = asyncio.get_running_loop()
        for index, conn in enumerate(self._reports):
            loop.add_reader(conn.fileno(), self._receive, index)

    def close(self) -> None:
        for index in range(len(self._reports)):
            self._stop_listening(index)

    def _receive(self, index: int) -> None:
        try:
            self._states[index] = self._reports[index].recv()
        except (EOFError, OSError):  # the worker has exited: its process sentinel reports that
            self._stop_listening(index)

    def _stop_listening(self, index: int) -> None:
        conn = self._reports[index]
        if not conn.closed:  # a closed pipe is one no longer listened to
            asyncio.get_running_loop().remove_reader(conn.fileno())
            conn.close()

    def all_alive(self) -> bool:
        return all(proc.is_alive() for proc in self._procs)

    def failing(self, exclude: Collection[str] = ()) -> list[str]:
        exited = [proc.name for proc in self._procs if not proc.is_alive()]
        if exited:
            return [f"worker process {', '.join(exited)} has exited"]
        waiting = []
        for index in range(len(self._procs)):
            conditions = self._states.get(index, {"worker": (False, "starting")})
            waiting += [f"worker {index}: {why}" for why in failing_reasons(conditions, exclude)]
        return waiting


def port_is_free(listen: HostPort) -> str:
    """Why the gRPC address cannot be ours ("" when it can): the workers share the
    port with SO_REUSEPORT, which would also let them join another process that
    serves it with that option; a plain bind first refuses any port in use."""
    return port_problem(listen, reuse_port=False)


def run_workers(cfg: Config, worker_main: Callable[[Config, int, Connection, Any], None]) -> int:
    taken = port_is_free(cfg.service.listen)
    if taken:
        log.critical("%s", taken, extra={"event": "start_failed"})
        return 2
    with tempfile.TemporaryDirectory(prefix="offline-exhook-metrics-") as metrics_dir:
        # spawned workers import prometheus-client afresh and pick this up
        os.environ[MULTIPROC_ENV] = metrics_dir
        worker_cfg = replace(cfg, service=replace(cfg.service, http=replace(cfg.service.http, enable=False)))
        ctx = multiprocessing.get_context("spawn")
        pipes = [ctx.Pipe(duplex=False) for _ in range(cfg.service.workers)]
        # each worker's count of connect hooks, read by all of them (pacing.ConnectCount)
        connects = ctx.RawArray("Q", cfg.service.workers)
        procs = [ctx.Process(target=worker_main, args=(worker_cfg, i, to_parent, connects),
                             name=f"offline-exhook-{i}")
                 for i, (_, to_parent) in enumerate(pipes)]
        view = WorkersReadiness(procs, [reports for reports, _ in pipes])
        return asyncio.run(_supervise(cfg, procs, view, [to_parent for _, to_parent in pipes], metrics_dir))


async def _supervise(cfg: Config, procs: Sequence[BaseProcess], view: WorkersReadiness,
                     worker_ends: Sequence[Connection], metrics_dir: str) -> int:
    http = None
    if cfg.service.http.enable:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, metrics_dir)  # type: ignore[no-untyped-call]
        # the multiprocess files carry no process_* metrics: read them for the parent and each worker
        registry.register(ProcessesCollector(lambda: _process_ids(procs)))
        http = OpsHttpServer(cfg.service.http.listen, view, registry, backend_name(cfg.backend), alive=view.all_alive)
        try:
            await http.start()
        except OSError as exc:
            log.critical("%s", exc)
            return 2
    view.listen()
    try:
        return await _run_until_exit(procs, worker_ends, metrics_dir)
    finally:
        view.close()
        if http is not None:
            await http.stop()


def _process_ids(procs: Sequence[BaseProcess]) -> dict[str, int]:
    """``process`` label -> pid: the supervisor and each live worker."""
    ids = {"supervisor": os.getpid()}
    ids.update({f"worker-{i}": proc.pid for i, proc in enumerate(procs) if proc.pid is not None and proc.is_alive()})
    return ids


async def _run_until_exit(procs: Sequence[BaseProcess], worker_ends: Sequence[Connection], metrics_dir: str) -> int:
    loop = asyncio.get_running_loop()
    exited: asyncio.Queue[BaseProcess] = asyncio.Queue()

    def on_exit(proc: BaseProcess) -> None:
        loop.remove_reader(proc.sentinel)
        proc.join()
        exited.put_nowait(proc)

    stopping = False  # set once the workers are told to stop: exits from then on are expected

    def forward(signum: int) -> None:
        nonlocal stopping
        stopping = True
        for proc in procs:
            if proc.pid is not None and proc.is_alive():
                os.kill(proc.pid, signum)

    for proc, worker_end in zip(procs, worker_ends, strict=True):
        proc.start()
        worker_end.close()  # the worker holds its own copy; the parent's would hide its exit from the pipe
        loop.add_reader(proc.sentinel, on_exit, proc)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, forward, sig)
    unexpected = False
    try:
        for running in range(len(procs) - 1, -1, -1):
            proc = await exited.get()
            if proc.pid is not None:
                mark_process_dead(proc.pid, metrics_dir)  # type: ignore[no-untyped-call]
            # a worker that leaves before it is told to, even with status 0 (say a
            # SIGTERM sent to it alone), is as gone as one that failed
            if (proc.exitcode or not stopping) and running:
                unexpected = unexpected or not stopping
                # half a service would take calls on some connections only: stop it all
                log.critical("%s exited with %s; stopping the other workers", proc.name, proc.exitcode,
                             extra={"event": "worker_exited", "worker_name": proc.name, "exitcode": proc.exitcode})
                forward(signal.SIGTERM)
    except BaseException:
        forward(signal.SIGTERM)  # never leave orphaned workers serving the port
        raise
    # a worker killed by a signal has a negative exit code: report it as a shell would (128 + signal)
    codes = [128 - code if code < 0 else code for code in (proc.exitcode or 0 for proc in procs)]
    # a worker gone unasked is a failure even if every status was 0: a supervisor restarts on failure
    return max([*codes, 1] if unexpected else codes)
