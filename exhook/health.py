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
        self._grpc_health = grpc_health
        self._redact = redact
        self._on_change = on_change  # told of every new (ready, reason), e.g. a worker's parent
        self.ready = False
        self.reason = "starting"
        self._announced: bool | None = None  # the state last published (gauge, gRPC health, log)
        self._stopping = False

    async def check(self) -> None:
        """Ping the backend once (bounded by the check interval) and publish the outcome."""
        try:
            async with asyncio.timeout(self.interval_s):
                await self._store.ping()
        except Exception as exc:  # any failure means "not reachable"; the text says why
            await self._publish(False, f"{self._store.name} unreachable: {one_line(exc)}")
        else:
            await self._publish(True, "")

    async def run(self) -> None:
        while True:
            await self.check()
            await asyncio.sleep(self.interval_s)

    async def shutting_down(self) -> None:
        self._stopping = True
        self.ready, self.reason = False, "shutting down"
        await self._grpc_health.enter_graceful_shutdown()

    async def _publish(self, ready: bool, reason: str) -> None:
        if self._stopping:
            return
        reason = self._redact(reason)
        if self._on_change is not None and (ready, reason) != (self.ready, self.reason):
            self._on_change(ready, reason)
        self.ready, self.reason = ready, reason
        if ready == self._announced:
            return
        self._announced = ready
        self._metrics.backend_up.set(1 if ready else 0)
        status = _SERVING if ready else _NOT_SERVING
        for name in ("", *HOOK_SERVICES):
            await self._grpc_health.set(name, status)
        if ready:
            log.info("ready: %s is reachable", self._store.name,
                     extra={"event": "ready", "backend": self._store.name})
        else:
            log.warning("not ready: %s", self.reason, extra={"event": "not_ready", "backend": self._store.name})
