"""The small HTTP port for operators: ``/healthz``, ``/readyz``, ``/metrics``.

``/healthz`` answers 200 while the process runs (a liveness probe); ``/readyz``
answers 200 while every readiness condition is ok (``exhook.health``) and 503 with
the failing ones otherwise; ``/readyz?exclude=emqx_api`` leaves the named
conditions out (as Kubernetes' own ``/readyz?exclude=``): that is the check for a
load balancer or compose's start order, which must not wait for EMQX itself.
``/metrics`` is the Prometheus text exposition of the service's registry.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from typing import Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from exhook.config import HostPort

log = logging.getLogger(__name__)


class ReadinessView(Protocol):
    def failing(self, exclude: Collection[str] = ()) -> list[str]:
        """``name: reason`` of every condition that is not ok (none: ready)."""
        ...


class OpsHttpServer:
    def __init__(
        self,
        listen: HostPort,
        readiness: ReadinessView,
        registry: CollectorRegistry,
        backend: str,
        alive: Callable[[], bool] = lambda: True,
    ) -> None:
        self._listen = listen
        self._readiness = readiness
        self._registry = registry
        self._backend = backend
        self._alive = alive
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._listen.host, self._listen.port)
        try:
            await site.start()
        except OSError as exc:
            await self.stop()
            raise OSError(f"exhook.http.listen: cannot listen on {self._listen}: {exc.strerror}") from None
        # the bound address: the configured port, or the one the OS chose for port 0
        self.port = int(self._runner.addresses[0][1])
        log.info("health and metrics on http://%s:%d", self._listen.host, self.port,
                 extra={"event": "http_listening", "port": self.port})

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _healthz(self, request: web.Request) -> web.Response:
        if self._alive():
            return web.json_response({"status": "up"})
        return web.json_response({"status": "down"}, status=503)

    async def _readyz(self, request: web.Request) -> web.Response:
        exclude = {name.strip() for value in request.query.getall("exclude", []) for name in value.split(",")}
        failing = self._readiness.failing(exclude)
        if not failing:
            return web.json_response({"status": "ready", "backend": self._backend})
        return web.json_response({"status": "not ready", "backend": self._backend, "reason": "; ".join(failing)},
                                 status=503)

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self._registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
