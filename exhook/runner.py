"""Runs the service: one process, or N worker processes sharing the gRPC port
(``exhook.supervisor``)."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
from multiprocessing.connection import Connection
from typing import Any

from exhook.config import Config
from exhook.config_checks import config_secrets, config_warnings
from exhook.health import Conditions, ReadinessListener
from exhook.logs import setup_logging, stop_logging
from exhook.pacing import ConnectCount
from exhook.spool import SpoolError
from exhook.supervisor import run_workers

log = logging.getLogger("exhook")


def setup_service_logging(cfg: Config, worker: int | None = None) -> None:
    setup_logging(cfg.service.log_level, cfg.service.log_format, worker, config_secrets(cfg))


def install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def serve(cfg: Config, on_readiness: ReadinessListener | None = None, worker: int | None = None,
                connects: ConnectCount | None = None) -> int:
    """Run until SIGTERM/SIGINT. Exit status: 0 when every answered write is in the
    store or the spool, 1 when some were lost, 2 when start-up failed."""
    from exhook.server import Service

    service = Service(cfg, on_readiness=on_readiness, worker=worker, reuse_port=worker is not None,
                      connects=connects)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await service.start()
    except (OSError, SpoolError) as exc:  # a port in use, a spool that cannot be written
        log.critical("%s", exc, extra={"event": "start_failed"})
        return 2
    freeze_startup_heap()
    await stop.wait()
    log.info("shutting down: finishing replays and in-flight writes")
    lost = await service.stop()
    if lost:
        log.critical("%d answered write ops could be neither stored nor spooled", lost,
                     extra={"event": "writes_lost", "lost": lost})
    return 1 if lost else 0


def freeze_startup_heap() -> None:
    """Keep what start-up made (modules, gRPC and protobuf objects, the store's driver),
    which lives as long as the process, out of the cyclic collector's full passes. Under
    load those ran every half second and walked all of it: 20-33 ms each with the event
    loop held, the p99 of a publish at 32 clients 24 ms against the no-op's 6-8 (with the
    heap frozen: passes of 1-3 ms, p99 8-9 ms; BENCHMARKS.md). What of it later becomes
    garbage (say a connection replaced after a failover) is never freed: bounded, once."""
    gc.collect()  # start-up's own garbage goes first, or it would stay for good
    gc.freeze()


def _report_to(parent: Connection) -> ReadinessListener:
    def report(conditions: Conditions) -> None:
        # a few hundred bytes per change of state: the pipe's buffer takes them without blocking
        try:
            parent.send(conditions)
        except OSError:
            pass  # the parent is gone, and it stops its workers when it goes
    return report


def _worker(cfg: Config, index: int, to_parent: Connection, connects: Any) -> None:
    setup_service_logging(cfg, index)
    try:
        install_uvloop()
        code = asyncio.run(serve(cfg, _report_to(to_parent), worker=index, connects=ConnectCount(connects, index)))
    finally:
        stop_logging()
    sys.exit(code)


def run(cfg: Config) -> int:
    """Run until SIGTERM/SIGINT; the exit code for the process."""
    setup_service_logging(cfg)
    try:
        for warning in config_warnings(cfg):  # once, before any worker starts
            log.warning("config: %s", warning, extra={"event": "config_warning"})
        if cfg.service.workers > 1:
            log.info("starting %d worker processes on %s", cfg.service.workers, cfg.service.listen)
            return run_workers(cfg, _worker)
        install_uvloop()
        return asyncio.run(serve(cfg))
    finally:
        stop_logging()
