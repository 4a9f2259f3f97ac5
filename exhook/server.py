"""The composition root: builds the service, starts it, and stops it.

Every part is set up next to its teardown on one ``AsyncExitStack``, so ``stop``
undoes exactly what ``start`` did, in reverse order, whatever step start-up
reached. The order of teardown is the shutdown contract:

1. readiness turns "shutting down" (and gRPC health NOT_SERVING);
2. the client queues take no new jobs and let running restores and replays finish,
   while the gRPC server still answers the ``message.publish`` calls of those replays;
3. the gRPC server stops (in-flight hook calls complete);
4. the writer writes what is queued to the store, or spools it, and reports how many
   ops were lost (the exit status is 0 only when none were);
5. the loops (the sweep after lost connect calls among them), the REST client, the
   spool, the store and the HTTP port close.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2_grpc
from grpc_health.v1._async import HealthServicer  # = health.aio.HealthServicer, which mypy cannot follow

from exhook.client_queue import ClientQueues
from exhook.config import Config
from exhook.config_checks import config_secrets
from exhook.emqx_api import EmqxApi
from exhook.grpc_options import server_options
from exhook.health import EMQX_API, Readiness, ReadinessListener
from exhook.held_rekeys import HeldRekeys
from exhook.hooks import HookLogic
from exhook.listen import add_grpc_port
from exhook.logs import count_dropped_lines, redactor
from exhook.loops import Loops
from exhook.metrics import Metrics
from exhook.missed_connects import ConnectRisk, MissedConnectSweep
from exhook.ops_http import OpsHttpServer
from exhook.pacing import AdaptiveLimit, ConnectCount
from exhook.replay import BrokerFlags, Replayer
from exhook.servicer import add_servicers
from exhook.spool import Spool, adopt_orphans, orphan_paths
from exhook.topics import TopicSet
from exhook.writer import OrderedWriter, WriterSettings
from storage import unreadable
from storage.base import Store, StoreConfigError, StoreError
from storage.factory import create_store
from storage.gated import GatedStore
from storage.retry import Backoff

log = logging.getLogger(__name__)

_OPEN_BACKOFF = Backoff(base=0.2, cap=5.0)
_PURGE_EVERY_S = 60.0
_PURGE_CHUNK = 1000
_SHUTDOWN_GRACE_S = 5.0
_FIRST_OPEN_WAIT_S = 2.0


def spool_path(path: str, worker: int | None) -> Path:
    """Worker N of a multi-process service has a spool of its own: ``path.N``."""
    return Path(path if worker is None else f"{path}.{worker}")


@dataclass
class Service:
    config: Config
    store: Store | None = None  # tests may bring their own
    metrics: Metrics = field(default_factory=Metrics)
    on_readiness: ReadinessListener | None = None  # a worker reports its readiness conditions to its parent
    worker: int | None = None  # index under the supervisor (its own spool), None when alone
    reuse_port: bool = False  # SO_REUSEPORT: only among the service's own workers
    connects: ConnectCount | None = None  # the connect hooks of all workers (pacing)
    port: int = 0
    readiness: Readiness = field(init=False)
    http: OpsHttpServer | None = field(init=False, default=None)
    lost: int = field(init=False, default=0)
    _stack: AsyncExitStack = field(init=False, default_factory=AsyncExitStack)
    _gate: GatedStore = field(init=False)
    _writer: OrderedWriter = field(init=False)
    _queues: ClientQueues = field(init=False)
    _held_rekeys: HeldRekeys = field(init=False)

    async def start(self) -> None:
        try:
            await self._start(self._stack)
        except BaseException:
            await self._stack.aclose()
            raise

    async def stop(self) -> int:
        """Stop as the module docstring says; return how many write ops were lost."""
        await self._stack.aclose()
        log.info("stopped", extra={"event": "stopped", "lost_writes": self.lost, **self.metrics.summary()})
        return self.lost

    async def idle(self) -> None:
        """Wait until background jobs are done and every queued write is in the store
        (held re-keys too)."""
        await self._queues.idle()
        self._held_rekeys.flush()
        await self._writer.drained()

    def _count_unreadable_rows(self, stack: AsyncExitStack) -> None:
        """Stored rows the backend's reads skip (storage.unreadable) count as replay skips."""
        counter = self.metrics.replay_messages_skipped.labels("unreadable")

        def count(backend: str) -> None:
            counter.inc()

        unreadable.listeners.append(count)
        stack.callback(unreadable.listeners.remove, count)

    async def _start(self, stack: AsyncExitStack) -> None:
        cfg, backend = self.config, self.config.backend
        count_dropped_lines(self.metrics.log_lines_dropped.inc)
        health = HealthServicer()
        self._gate = gate = GatedStore(self.store or create_store(backend), self.metrics.store_failure)
        stack.push_async_callback(gate.close)
        self._count_unreadable_rows(stack)
        self.readiness = Readiness(gate.store, cfg.service.http.check_interval_ms / 1000, self.metrics, health,
                                   redactor(config_secrets(cfg)), self.on_readiness)
        await self._start_http(stack)
        loops = Loops(self.metrics, self.readiness.set_condition)
        stack.push_async_callback(loops.stop_all)
        spool = Spool(spool_path(cfg.service.spool.path, self.worker))
        await spool.open()
        stack.push_async_callback(spool.close)
        await self._adopt_orphan_spools(spool)
        # A store that hangs (a stopped server still accepts connections) must not keep
        # the gRPC port closed for the backend's whole timeout: the broker needs answers.
        # The first open gets a short while; if it is still running it goes on in the
        # background, owned by the open loop (and cancelled at stop if it still runs).
        opening = asyncio.create_task(self._open_store(gate), name="open-store-first")
        stack.push_async_callback(_cancel, opening)
        await asyncio.wait({opening}, timeout=_FIRST_OPEN_WAIT_S)
        if not opening.done():
            log.warning("%s has not answered within %.0f s: serving, opening it in the background", gate.name,
                        _FIRST_OPEN_WAIT_S, extra={"event": "store_open_slow", "backend": gate.name})
        if not opening.done() or not opening.result():  # an unexpected error fails the start-up, as before
            loops.start("open-store", lambda: self._open_loop(gate, opening))
        await self.readiness.check()
        loops.start("readiness", self.readiness.run)
        self._writer = writer = self._make_writer(gate.store, spool)
        self.readiness.add_probe("writer", writer.problem)
        loops.start("writer", writer.run)
        stack.push_async_callback(self._close_writer)
        api = EmqxApi(cfg.service.emqx, self.metrics)
        await api.start()
        stack.push_async_callback(api.close)
        # not ready until EMQX's API has accepted the key once (probe_now below)
        self.readiness.add_probe(EMQX_API, api.check, self.metrics.emqx_api_up, checked=False)
        self._queues = ClientQueues(self.metrics, slots=AdaptiveLimit(connects=self.connects))
        logic = self._logic(gate.store, writer, api)
        connect_risk = ConnectRisk.for_hook_timeout(cfg.service.emqx.hook_timeout_ms, self.metrics)
        self._held_rekeys = logic.held_rekeys
        loops.start("held-rekeys", logic.held_rekeys.run)
        loops.start("later-retries", logic.later.run)
        server = await self._start_grpc(logic, connect_risk)
        # runs after the server's stop (no acks come any more) and before the writer's close
        stack.callback(logic.held_rekeys.flush)
        stack.push_async_callback(server.stop, _SHUTDOWN_GRACE_S)
        # registered after the server's stop, so it runs before it: replays finish while gRPC still answers
        stack.push_async_callback(self._queues.close, _SHUTDOWN_GRACE_S)
        stack.push_async_callback(self.readiness.shutting_down)
        # once the port answers (EMQX blackholed must not keep it closed), then at every check
        await self.readiness.probe_now(EMQX_API)
        loops.start("purge-expired", lambda: self._purge_loop(gate.store))
        sweep = MissedConnectSweep(connect_risk, api, logic.restore_missed, logic.flags, self.metrics,
                                   busy=lambda: self._queues.waiting)
        loops.start("loop-stalls", connect_risk.watch_stalls)
        loops.start("missed-connects", sweep.run)
        self._log_started(gate.name, TopicSet(backend.topics))

    async def _start_http(self, stack: AsyncExitStack) -> None:
        http_cfg = self.config.service.http
        if not http_cfg.enable:
            return
        self.http = OpsHttpServer(http_cfg.listen, self.readiness, self.metrics.registry, self._gate.name)
        await self.http.start()
        stack.push_async_callback(self.http.stop)

    async def _adopt_orphan_spools(self, spool: Spool) -> None:
        """Ops an earlier run with another number of workers left in spools no process
        of this run owns are taken over (so a changed ``workers`` loses nothing)."""
        if self.worker not in (None, 0):
            return
        orphans = orphan_paths(self.config.service.spool.path, self.worker, self.config.service.workers)
        if orphans:
            moved = await adopt_orphans(spool, orphans)
            if moved:  # spool files an earlier run left empty are only cleaned up
                log.warning("took over %d spooled write ops of an earlier run", moved,
                            extra={"event": "spool_adopted", "ops": moved, "files": ",".join(map(str, orphans))})

    def _make_writer(self, store: Store, spool: Spool) -> OrderedWriter:
        svc, backend = self.config.service, self.config.backend
        settings = WriterSettings(batch_size=backend.batch_size, max_pending=svc.max_pending_writes,
                                  spool_max_bytes=svc.spool.max_bytes, linger_s=backend.batch_time_ms / 1000,
                                  spill_after_s=svc.publish_deadline_ms / 1000)
        return OrderedWriter(store, spool, self.metrics, settings,
                             on_health=lambda ok, reason: self.readiness.set_condition("writer", ok, reason))

    async def _close_writer(self) -> None:
        self.lost = await self._writer.close(_SHUTDOWN_GRACE_S)

    def _logic(self, store: Store, writer: OrderedWriter, api: EmqxApi) -> HookLogic:
        svc, backend = self.config.service, self.config.backend
        tracked = TopicSet(backend.topics)
        flags = BrokerFlags()
        replayer = Replayer(store, api, self.metrics, tracked, flags, svc.replay_batch_size)
        # with several workers most acks reach another process than the replay's re-key
        hold_s = svc.replay_rekey_hold_ms / 1000 if svc.workers == 1 else 0.0
        return HookLogic(tracked, store, writer, replayer, self._queues, self.metrics, flags,
                         svc.publish_deadline_ms, hold_s)

    async def _start_grpc(self, logic: HookLogic, connect_risk: ConnectRisk) -> grpc.aio.Server:
        svc = self.config.service
        server = grpc.aio.server(options=server_options(self.reuse_port))
        self.metrics.expect_hooks(name for name, _ in logic.hook_specs())
        add_servicers(server, logic, self.metrics, svc.allowed_clients, connect_risk)
        health_pb2_grpc.add_HealthServicer_to_server(self.readiness.grpc_health, server)
        # a bad or taken address: one OSError naming exhook.listen (exit status 2)
        self.port = await add_grpc_port(server, svc.listen, svc.ssl, reuse_port=self.reuse_port)
        await server.start()
        return server

    async def _open_store(self, gate: GatedStore) -> bool:
        """Open the store; if it is unreachable or unusable the service starts anyway
        (the broker needs answers: writes go to the spool) and keeps trying."""
        try:
            await gate.open()
            return True
        except StoreError as exc:
            self._report_open_failure(gate, exc)
            return False

    def _report_open_failure(self, gate: GatedStore, exc: StoreError) -> None:
        kind = "misconfigured" if isinstance(exc, StoreConfigError) else "unreachable"
        log.error("%s %s at start-up, retrying in the background", gate.name, kind,
                  extra={"event": "store_unreachable", "backend": gate.name, "error": str(exc)})

    async def _open_loop(self, gate: GatedStore, first: asyncio.Task[bool]) -> None:
        await asyncio.wait({first})  # the start-up attempt, if it still runs (never raises)
        for pause in _OPEN_BACKOFF.delays():
            if gate.is_open:  # the start-up attempt got through after all
                break
            await asyncio.sleep(pause)
            try:
                await gate.open()
            except StoreError as exc:
                log.debug("%s still not open: %s", gate.name, exc)
                continue
            break
        log.warning("%s is open now", gate.name, extra={"event": "store_opened", "backend": gate.name})
        await self.readiness.check()

    async def _purge_loop(self, store: Store) -> None:
        while True:
            await asyncio.sleep(_PURGE_EVERY_S)
            try:
                purged = _PURGE_CHUNK
                while purged >= _PURGE_CHUNK:  # bounded chunks keep each statement short
                    purged = await store.purge_expired(_PURGE_CHUNK)
            except StoreError as exc:
                log.debug("purge of expired messages skipped: %s", exc)

    def _log_started(self, backend: str, tracked: TopicSet) -> None:
        svc = self.config.service
        log.info("listening on %s:%d (exhook v2 and v3%s), backend %s, topics %s",
                 svc.listen.host, self.port, ", TLS" if svc.ssl.enable else "", backend,
                 ", ".join(tracked.filters) or "-")


async def _cancel(task: asyncio.Task[bool]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
