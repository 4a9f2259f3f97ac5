"""Console entry point: ``offline-exhook --config config.hocon``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
from dataclasses import replace

from exhook.config import Config, ConfigError, load_config
from storage.base import StoreConfigError

log = logging.getLogger("exhook")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="offline-exhook", description=__doc__)
    parser.add_argument("--config", default=os.environ.get("OFFLINE_EXHOOK_CONFIG", "config.hocon"),
                        help="HOCON config file (default: config.hocon)")
    parser.add_argument("--workers", type=int, default=None,
                        help="override exhook.workers (processes sharing the port)")
    parser.add_argument("--check-config", action="store_true", help="validate the config and exit")
    parser.add_argument("--rebuild-topic-index", action="store_true",
                        help="Redis only: index the topics of a store written by the Erlang plugin "
                             "(needed once for wildcard replays after a migration), then exit")
    return parser.parse_args(argv)


def _setup_logging(level: str, worker: int | None = None) -> None:
    tag = f" [worker {worker}]" if worker is not None else ""
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s %(name)s{tag}: %(message)s")


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def serve(cfg: Config) -> int:
    from exhook.server import Service

    service = Service(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await service.start()
    except StoreConfigError as exc:
        log.critical("%s", exc)
        await service.stop()
        return 2
    await stop.wait()
    log.info("shutting down: finishing in-flight writes and replays")
    await service.stop()
    return 0


async def _rebuild_topic_index(cfg: Config) -> int:
    from storage.factory import create_store

    store = create_store(cfg.backend)
    rebuild = getattr(store, "rebuild_topic_index", None)
    if rebuild is None:
        print("offline-exhook: --rebuild-topic-index applies to the redis backend only", file=sys.stderr)
        return 2
    await store.open()
    try:
        found = await rebuild()
    finally:
        await store.close()
    print(f"offline-exhook: indexed {found} topic(s) with stored messages")
    return 0


def _worker(cfg: Config, index: int) -> None:
    _setup_logging(cfg.service.log_level, index)
    _install_uvloop()
    sys.exit(asyncio.run(serve(cfg)))


def _run_workers(cfg: Config) -> int:
    """N processes on one port (gRPC sets SO_REUSEPORT; the kernel spreads the
    broker's connections), each with its own pools and writer."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(cfg, i), name=f"offline-exhook-{i}")
             for i in range(cfg.service.workers)]
    for proc in procs:
        proc.start()

    def forward(signum: int, _frame: object) -> None:
        for proc in procs:
            if proc.pid is not None and proc.is_alive():
                os.kill(proc.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    running = list(procs)
    while running:
        multiprocessing.connection.wait([proc.sentinel for proc in running])
        for proc in [p for p in running if not p.is_alive()]:
            running.remove(proc)
            if proc.exitcode and running:
                # half a service would take calls on some connections only: stop it all
                log.critical("%s exited with %s; stopping the other workers", proc.name, proc.exitcode)
                forward(signal.SIGTERM, None)
    # a worker killed by a signal has a negative exit code: report it as a shell would (128 + signal)
    codes = [128 - code if code < 0 else code for code in (proc.exitcode or 0 for proc in procs)]
    return max(codes)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"offline-exhook: config error: {exc}", file=sys.stderr)
        sys.exit(2)
    if args.workers is not None:
        cfg = replace(cfg, service=replace(cfg.service, workers=max(1, args.workers)))
    if args.rebuild_topic_index:
        sys.exit(asyncio.run(_rebuild_topic_index(cfg)))
    if args.check_config:
        print(f"offline-exhook: {args.config} is valid ({type(cfg.backend).__name__})")
        return
    if cfg.service.workers > 1:
        _setup_logging(cfg.service.log_level)
        log.info("starting %d worker processes on %s", cfg.service.workers, cfg.service.listen)
        sys.exit(_run_workers(cfg))
    _setup_logging(cfg.service.log_level)
    _install_uvloop()
    sys.exit(asyncio.run(serve(cfg)))


if __name__ == "__main__":
    main()
