"""Readiness: is the backend reachable? Checked by a periodic ping and published to
``/readyz``, the ``backend_up`` gauge and the standard gRPC health service.

The gRPC health service answers for the whole server (``""``) and for both
``HookProvider`` services: SERVING while the backend answers, NOT_SERVING (with
the reason on ``/readyz`` and in the log) when it does not, and for good once
shutdown starts. The service keeps answering hooks when the backend is down
(at the publish deadline), so liveness is ``/healthz``, never this.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer  # = health.aio.HealthServicer, which mypy cannot follow

from exhook.metrics import Metrics
from storage.base import Store
from storage.errors import one_line

log = logging.getLogger(__name__)

HOOK_SERVICES = ("emqx.exhook.v3.HookProvider", "emqx.exhook.v2.HookProvider")
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Readiness:
    """Ready = the store answers its ping AND no other condition is failing. Other
    components report conditions (``set_condition``: the writer stalled, the spool
    draining behind a broken store, a background loop restarting) or are asked at
    every check (``add_probe``). gRPC health follows the store alone."""

    def __init__(
        self,
        store: Store,
        interval_s: float,
        metrics: Metrics,
        grpc_health: HealthServicer,
        redact: Callable[[str], str],
        on_change: Callable[[bool, str], None] | None = None,
    ) -> None:
        self._store = store
        self.interval_s = interval_s
        self._metrics = metrics
        self.grpc_health = grpc_health
        self._redact = redact
        self._on_change = on_change  # told of every new (ready, reason), e.g. a worker's parent
        self.ready = False
        self.reason = "starting"
        self._store_reason: str | None = "starting"  # None: the store answers
        self._conditions: dict[str, str] = {}  # failing condition -> why
        self._probes: dict[str, Callable[[], str]] = {}
        self._announced: bool | None = None  # the store state last published (gauge, gRPC health)
        self._stopping = False

    def set_condition(self, name: str, ok: bool, reason: str) -> None:
        if ok:
            self._conditions.pop(name, None)
        else:
            self._conditions[name] = reason or name
        self._refresh()

    def add_probe(self, name: str, probe: Callable[[], str]) -> None:
        """``probe()`` returns why ``name`` is not ready ("" when it is); asked at every check."""
        self._probes[name] = probe

    async def check(self) -> None:
        """Ping the backend once (bounded by the check interval), ask the probes,
        and publish the outcome."""
        try:
            async with asyncio.timeout(self.interval_s):
                await self._store.ping()
        except Exception as exc:  # any failure means "not reachable"; the text says why
            await self._publish_store(f"{self._store.name} unreachable: {one_line(exc)}")
        else:
            await self._publish_store(None)
        for name, probe in self._probes.items():
            why = probe()
            self.set_condition(name, not why, why)
        self._refresh()

    async def run(self) -> None:
        while True:
            await self.check()
            await asyncio.sleep(self.interval_s)

    async def shutting_down(self) -> None:
        self._stopping = True
        self.ready, self.reason = False, "shutting down"
        await self.grpc_health.enter_graceful_shutdown()

    async def _publish_store(self, reason: str | None) -> None:
        if self._stopping:
            return
        self._store_reason = reason
        up = reason is None
        if up == self._announced:
            return
        self._announced = up
        self._metrics.backend_up.set(1 if up else 0)
        status = _SERVING if up else _NOT_SERVING
        for name in ("", *HOOK_SERVICES):
            await self.grpc_health.set(name, status)

    def _refresh(self) -> None:
        if self._stopping:
            return
        reasons = [r for r in (self._store_reason, *self._conditions.values()) if r]
        ready, reason = not reasons, self._redact("; ".join(reasons))
        if (ready, reason) == (self.ready, self.reason):
            return
        was_ready = self.ready
        self.ready, self.reason = ready, reason
        if self._on_change is not None:
            self._on_change(ready, reason)
        if ready:
            log.info("ready: %s is reachable", self._store.name,
                     extra={"event": "ready", "backend": self._store.name})
        elif was_ready or reason != "starting":
            log.warning("not ready: %s", reason, extra={"event": "not_ready", "backend": self._store.name})
