"""Assembles the service: store, writer, REST client, hook logic, gRPC server;
starts it and stops it gracefully."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2_grpc
from grpc_health.v1._async import HealthServicer  # = health.aio.HealthServicer, which mypy cannot follow

from exhook.client_queue import ClientQueues
from exhook.config import Config, config_secrets
from exhook.emqx_api import EmqxApi
from exhook.grpc_options import server_options
from exhook.health import Readiness
from exhook.hooks import HookLogic
from exhook.logs import redactor
from exhook.metrics import Metrics
from exhook.ops_http import OpsHttpServer
from exhook.replay import BrokerFlags, Replayer
from exhook.servicer import add_servicers
from exhook.tls import grpc_server_credentials
from exhook.topics import TopicSet
from exhook.writer import OrderedWriter
from storage.base import Store, StoreConfigError, StoreError
from storage.factory import create_store
from storage.gated import GatedStore

log = logging.getLogger(__name__)

_OPEN_RETRY_MAX_S = 5.0
_PURGE_EVERY_S = 60.0
_PURGE_CHUNK = 1000
_SHUTDOWN_GRACE_S = 5.0


@dataclass
class Service:
    config: Config
    store: Store | None = None
    metrics: Metrics = field(default_factory=Metrics)
    port: int = 0
    _gate: GatedStore | None = None
    _server: grpc.aio.Server | None = None
    _writer: OrderedWriter | None = None
    _api: EmqxApi | None = None
    _queues: ClientQueues | None = None
    _logic: HookLogic | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _health: HealthServicer = field(default_factory=HealthServicer)
    readiness: Readiness | None = None
    http: OpsHttpServer | None = None
    on_readiness: Callable[[bool, str], None] | None = None  # a worker reports to its parent

    async def start(self) -> None:
        cfg = self.config
        backend = cfg.backend
        gate = self._gate = GatedStore(self.store or create_store(backend), self.metrics.store_failure)
        await self._open_store_or_retry(gate)
        self.readiness = Readiness(gate, cfg.service.http.check_interval_ms / 1000, self.metrics, self._health,
                                   redactor(config_secrets(cfg)), self.on_readiness)
        await self.readiness.check()
        self._tasks.append(asyncio.create_task(self.readiness.run(), name="readiness"))
        if cfg.service.http.enable:
            self.http = OpsHttpServer(cfg.service.http.listen, self.readiness, self.metrics.registry, gate.name)
            await self.http.start()
        tracked = TopicSet(backend.topics)
        flags = BrokerFlags()
        self._writer = OrderedWriter(gate, self.metrics, backend.batch_size, backend.batch_time_ms,
                                     cfg.service.max_pending_writes)
        self._writer.start()
        self._api = EmqxApi(cfg.service.emqx, self.metrics)
        await self._api.start()
        self._queues = ClientQueues(self.metrics)
        replayer = Replayer(gate, self._api, self.metrics, tracked, flags, cfg.service.replay_batch_size)
        self._logic = HookLogic(tracked, gate, self._writer, replayer, self._queues, self.metrics, flags,
                                cfg.service.publish_deadline_ms)
        self._server = grpc.aio.server(options=server_options())
        add_servicers(self._server, self._logic, self.metrics)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        listen = cfg.service.listen
        if cfg.service.ssl.enable:
            self.port = self._server.add_secure_port(f"{listen}", grpc_server_credentials(cfg.service.ssl))
        else:
            self.port = self._server.add_insecure_port(f"{listen}")
        if self.port == 0:
            raise OSError(f"exhook.listen: cannot listen on {listen}")
        await self._server.start()
        self._tasks.append(asyncio.create_task(self._purge_loop(gate), name="purge-expired"))
        if not tracked:
            log.warning("%s.topics is empty: the backend is inactive and no hooks are registered",
                        gate.name)
        log.info("listening on %s:%d (exhook v2 and v3%s), backend %s, topics %s",
                 listen.host, self.port, ", TLS" if cfg.service.ssl.enable else "", gate.name,
                 ", ".join(tracked.filters) or "-")

    async def _open_store_or_retry(self, gate: GatedStore) -> None:
        """Open the store; if it is unreachable, keep trying in the background (the
        service must answer the broker meanwhile). A misconfiguration is fatal."""
        try:
            await gate.open()
            return
        except StoreConfigError:
            raise
        except StoreError as exc:
            log.error("%s unreachable at start-up, retrying in the background", gate.name,
                      extra={"event": "store_unreachable", "backend": gate.name, "error": str(exc)})
        self._tasks.append(asyncio.create_task(self._open_loop(gate), name="open-store"))

    async def _open_loop(self, gate: GatedStore) -> None:
        delay = 0.2
        while True:
            await asyncio.sleep(delay)
            try:
                await gate.open()
            except StoreConfigError as exc:
                log.critical("%s", exc)
                raise
            except StoreError as exc:
                delay = min(delay * 2, _OPEN_RETRY_MAX_S)
                log.debug("%s still unreachable: %s", gate.name, exc)
                continue
            log.warning("%s is reachable now", gate.name, extra={"event": "store_opened", "backend": gate.name})
            return

    async def _purge_loop(self, gate: GatedStore) -> None:
        while True:
            await asyncio.sleep(_PURGE_EVERY_S)
            try:
                purged = _PURGE_CHUNK
                while purged >= _PURGE_CHUNK:  # bounded chunks keep each statement short
                    purged = await gate.purge_expired(_PURGE_CHUNK)
            except StoreError as exc:
                log.debug("purge of expired messages skipped: %s", exc)

    async def idle(self) -> None:
        """Wait until background jobs are done and every queued write is durable."""
        if self._queues is not None:
            await self._queues.idle()
        if self._writer is not None:
            await self._writer.drained()

    async def stop(self) -> None:
        """Stop accepting calls, finish in-flight hooks, replays and writes, close."""
        if self.readiness is not None:
            await self.readiness.shutting_down()
        if self._server is not None:
            await self._server.stop(_SHUTDOWN_GRACE_S)
        if self._queues is not None:
            await self._queues.close(_SHUTDOWN_GRACE_S)
        if self._logic is not None:
            await self._logic.close()
        if self._writer is not None:
            await self._writer.close(_SHUTDOWN_GRACE_S)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._api is not None:
            await self._api.close()
        if self._gate is not None:
            await self._gate.close()
        if self.http is not None:
            await self.http.stop()
        log.info("stopped", extra={"event": "stopped", **self.metrics.summary()})
