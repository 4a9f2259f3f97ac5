"""Runs the service: one process, or N worker processes sharing the gRPC port
(``exhook.supervisor``)."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from multiprocessing.connection import Connection

from exhook.config import Config, config_secrets, config_warnings
from exhook.health import Conditions, ReadinessListener
from exhook.logs import setup_logging
from exhook.supervisor import run_workers
from storage.base import StoreConfigError

log = logging.getLogger("exhook")


def setup_service_logging(cfg: Config, worker: int | None = None) -> None:
    setup_logging(cfg.service.log_level, cfg.service.log_format, worker, config_secrets(cfg))


def install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def serve(cfg: Config, on_readiness: ReadinessListener | None = None) -> int:
    from exhook.server import Service

    service = Service(cfg, on_readiness=on_readiness)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await service.start()
    except (StoreConfigError, OSError) as exc:  # a misconfigured store, a port in use
        log.critical("%s", exc, extra={"event": "start_failed"})
        await service.stop()
        return 2
    await stop.wait()
    log.info("shutting down: finishing in-flight writes and replays")
    await service.stop()
    return 0


def _report_to(parent: Connection) -> ReadinessListener:
    def report(conditions: Conditions) -> None:
        # a few hundred bytes per change of state: the pipe's buffer takes them without blocking
        try:
            parent.send(conditions)
        except OSError:
            pass  # the parent is gone, and it stops its workers when it goes
    return report


def _worker(cfg: Config, index: int, to_parent: Connection) -> None:
    setup_service_logging(cfg, index)
    install_uvloop()
    sys.exit(asyncio.run(serve(cfg, _report_to(to_parent))))


def run(cfg: Config) -> int:
    """Run until SIGTERM/SIGINT; the exit code for the process."""
    setup_service_logging(cfg)
    for warning in config_warnings(cfg):  # once, before any worker starts
        log.warning("config: %s", warning, extra={"event": "config_warning"})
    if cfg.service.workers > 1:
        log.info("starting %d worker processes on %s", cfg.service.workers, cfg.service.listen)
        return run_workers(cfg, _worker)
    install_uvloop()
    return asyncio.run(serve(cfg))
