"""Readiness: a set of named conditions, each ok or not with a reason.

``/readyz`` is ready only while every condition is ok; its reason lists the failing
ones as ``name: reason``. Two kinds of conditions:

* probes, checked at start and every ``http.check_interval``: ``store`` (the
  backend's ping; it also drives the ``backend_up`` gauge and the gRPC health
  service) and ``emqx_api`` (one authenticated call to EMQX's REST API; the
  ``emqx_api_up`` gauge), added with ``add_probe``;
* conditions other components report when their state changes, with
  ``set_condition(name, ok, reason)`` (e.g. ``writer`` stalled, ``spool`` draining).

The gRPC health service answers for the whole server (``""``) and for both
``HookProvider`` services, and follows the ``store`` condition only: EMQX must keep
calling the service when only the REST API is wrong (messages are still stored,
only replays wait), and a NOT_SERVING service is one a load balancer stops routing
to. Once shutdown starts everything is not ready for good. The service keeps
answering hooks when the store is down (at the publish deadline), so liveness is
``/healthz``, never this.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Collection, Mapping

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer  # = health.aio.HealthServicer, which mypy cannot follow
from prometheus_client import Gauge

from exhook.metrics import Metrics
from storage.base import Store
from storage.errors import first_line, one_line
from storage.gated import StoreNotOpen

log = logging.getLogger(__name__)

HOOK_SERVICES = ("emqx.exhook.v3.HookProvider", "emqx.exhook.v2.HookProvider")
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

STORE = "store"
EMQX_API = "emqx_api"
SHUTDOWN = "shutdown"

# name -> (ok, reason); what a worker sends its parent whenever it changes
Conditions = dict[str, tuple[bool, str]]
ReadinessListener = Callable[[Conditions], None]
# None or "" = fine, else the reason in one line; asked at every check (a coroutine function or not)
Probe = Callable[[], Awaitable[str | None] | str | None]


def failing_reasons(conditions: Mapping[str, tuple[bool, str]], exclude: Collection[str] = ()) -> list[str]:
    """``name: reason`` of every condition that is not ok, in the order they were added."""
    return [f"{name}: {reason}" for name, (ok, reason) in conditions.items() if not ok and name not in exclude]


class Readiness:
    def __init__(
        self,
        store: Store,
        interval_s: float,
        metrics: Metrics,
        grpc_health: HealthServicer,
        redact: Callable[[str], str],
        on_change: ReadinessListener | None = None,
    ) -> None:
        self._store = store
        self.interval_s = interval_s
        self._metrics = metrics
        self.grpc_health = grpc_health
        self._redact = redact
        self._on_change = on_change  # told of every change, e.g. a worker's parent
        self._conditions: Conditions = {STORE: (False, "starting")}
        self._probes: dict[str, tuple[Probe, Gauge | None]] = {}
        self._store_announced: bool | None = None  # the store state last published (gauge, gRPC health)
        self._stopping = False

    # -- what /readyz shows ------------------------------------------------------
    @property
    def ready(self) -> bool:
        return not self.failing()

    @property
    def reason(self) -> str:
        return "; ".join(self.failing())

    def failing(self, exclude: Collection[str] = ()) -> list[str]:
        """``name: reason`` of each condition that is not ok, except the ``exclude``d."""
        if self._stopping:
            return ["shutting down"]
        return failing_reasons(self._conditions, exclude)

    def conditions(self) -> Conditions:
        return dict(self._conditions)

    # -- reporting ---------------------------------------------------------------
    def set_condition(self, name: str, ok: bool, reason: str = "") -> None:
        """Report a condition (any component, any time): ``/readyz`` is not ready while
        it is not ok, and says ``name: reason``. Logged when it changes."""
        reason = "" if ok else self._redact(reason) or "not ok"
        before = self._conditions.get(name)
        if before == (ok, reason) or self._stopping:
            return
        self._conditions[name] = (ok, reason)
        if ok:
            log.info("%s ok", name, extra={"event": "condition_ok", "condition": name})
        else:  # a new failure, or a new reason for one (unreachable, then 401 once EMQX is up)
            log.warning("not ready: %s: %s", name, reason, extra={"event": "not_ready", "condition": name})
        if self._on_change is not None:
            self._on_change(self.conditions())

    def add_probe(self, name: str, probe: Probe, gauge: Gauge | None = None, checked: bool = True) -> None:
        """Ask ``probe`` at every check (the next ``check()`` included); ``gauge`` follows
        it (1 ok, 0 not). ``checked=False``: not ready until it has answered once (no
        line is logged for that, it is no failure)."""
        self._probes[name] = (probe, gauge)
        if not checked:
            self._conditions[name] = (False, "not checked yet")
            if self._on_change is not None:
                self._on_change(self.conditions())

    async def probe_now(self, name: str) -> None:
        """Ask one probe at once (e.g. the EMQX API at start-up, before the first periodic check)."""
        probe, gauge = self._probes[name]
        await self._run_probe(name, probe, gauge)

    # -- the periodic check ------------------------------------------------------
    async def check(self) -> None:
        """Ping the store and run every probe once (each bounded by the check interval)."""
        runs = [self._ping_store()]
        runs += [self._run_probe(name, probe, gauge) for name, (probe, gauge) in self._probes.items()]
        await asyncio.gather(*runs)

    async def run(self) -> None:
        while True:
            await self.check()
            await asyncio.sleep(self.interval_s)

    async def shutting_down(self) -> None:
        self._stopping = True
        await self.grpc_health.enter_graceful_shutdown()
        if self._on_change is not None:
            self._on_change({SHUTDOWN: (False, "shutting down")})

    async def _ping_store(self) -> None:
        try:
            async with asyncio.timeout(self.interval_s):
                await self._store.ping()
        except StoreNotOpen as exc:  # its text already says which store and why
            self.set_condition(STORE, False, first_line(exc))
        except Exception as exc:  # any failure means "not reachable"; the text says why
            self.set_condition(STORE, False, f"{self._store.name} unreachable: {one_line(exc)}")
        else:
            self.set_condition(STORE, True)
        await self._announce_store()

    async def _run_probe(self, name: str, probe: Probe, gauge: Gauge | None) -> None:
        try:
            async with asyncio.timeout(self.interval_s):
                answer = probe()
                why = await answer if inspect.isawaitable(answer) else answer
        except TimeoutError:
            why = f"no answer within the check interval ({self.interval_s:g} s)"
        except Exception as exc:  # a probe that fails says why in its exception
            why = one_line(exc)
        self.set_condition(name, not why, why or "")
        if gauge is not None:
            gauge.set(0 if why else 1)

    async def _announce_store(self) -> None:
        """``backend_up`` and the gRPC health status follow the store condition."""
        ok = self._conditions[STORE][0]
        if self._stopping or ok == self._store_announced:
            return
        self._store_announced = ok
        self._metrics.backend_up.set(1 if ok else 0)
        status = _SERVING if ok else _NOT_SERVING
        for name in ("", *HOOK_SERVICES):
            await self.grpc_health.set(name, status)
