"""Supervised background loops.

The service's long-running loops (the writer, reopening the store, purging
expired messages, readiness checks) must not die quietly: an unexpected exception
is logged once with its cause, counted in ``loop_restarts_total{loop}``, makes the
service not ready with a reason, and the loop starts again after a backoff (the
service's one retry policy). A loop that returns has finished its job.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from exhook.metrics import Metrics
from storage.errors import one_line
from storage.retry import Backoff

log = logging.getLogger(__name__)

Condition = Callable[[str, bool, str], None]


class Loops:
    def __init__(self, metrics: Metrics, on_condition: Condition,
                 backoff: Backoff = Backoff(base=0.5, cap=30.0)) -> None:
        self._metrics = metrics
        self._on_condition = on_condition
        self._backoff = backoff
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def start(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        self._tasks[name] = asyncio.create_task(self._supervise(name, loop), name=name)

    async def _supervise(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        failures = 0
        while True:
            try:
                await loop()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                self._metrics.loop_restarted(name)
                pause = self._backoff.delay(failures)
                log.error("background loop %s failed, restarting in %.1f s", name, pause,
                          extra={"event": "loop_failed", "loop": name, "error": one_line(exc),
                                 "failures": failures})
                self._on_condition(f"loop {name}", False, f"{name} loop failed: {one_line(exc)}")
                await asyncio.sleep(pause)
                self._on_condition(f"loop {name}", True, "")

    async def stop(self, name: str) -> None:
        task = self._tasks.pop(name, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def stop_all(self) -> None:
        for name in list(self._tasks):
            await self.stop(name)
