"""Per-client ordered background work.

EMQX blocks a client while any of its hooks runs, so the service answers at once
and does the slow part (database reads, REST calls, replays) here. Jobs of one
client run one after another in the order their hooks arrived; jobs of different
clients run concurrently, at most ``max_running`` at a time.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable

from exhook.metrics import Metrics
from storage.errors import one_line

log = logging.getLogger(__name__)

Job = Callable[[], Awaitable[None]]


class ClientQueues:
    def __init__(self, metrics: Metrics, max_per_client: int = 1000, max_running: int = 64) -> None:
        self._metrics = metrics
        self._max_per_client = max_per_client
        self._slots = asyncio.Semaphore(max_running)
        self._jobs: dict[str, deque[tuple[str, Job]]] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._closing = False

    def submit(self, clientid: str, what: str, job: Job) -> bool:
        """Queue ``job`` behind the client's earlier jobs. False if refused
        (shutting down, or the client has too much queued)."""
        if self._closing:
            return False
        jobs = self._jobs.setdefault(clientid, deque())
        if len(jobs) >= self._max_per_client:
            self._metrics.jobs_dropped.inc()
            log.warning("client job queue full: job dropped",
                        extra={"event": "job_dropped", "clientid": clientid, "queued": len(jobs), "job": what})
            return False
        jobs.append((what, job))
        if clientid not in self._tasks:
            self._tasks[clientid] = asyncio.create_task(self._drain(clientid), name=f"client:{clientid}")
        return True

    async def _drain(self, clientid: str) -> None:
        jobs = self._jobs[clientid]
        try:
            while jobs:
                what, job = jobs[0]
                async with self._slots:
                    try:
                        await job()
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:  # one line with the cause (a 401, a store error), no traceback
                        log.error("client job failed: %s", one_line(exc),
                                  extra={"event": "job_failed", "clientid": clientid, "job": what})
                jobs.popleft()
        finally:
            self._tasks.pop(clientid, None)
            if not jobs:
                self._jobs.pop(clientid, None)

    async def idle(self) -> None:
        """Wait until no job is queued or running (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks.values()), return_exceptions=True)

    async def close(self, timeout: float) -> None:
        """Refuse new jobs, let queued ones finish for ``timeout`` s, cancel the rest."""
        self._closing = True
        try:
            await asyncio.wait_for(self.idle(), timeout)
        except TimeoutError:
            log.warning("shutdown: cancelling background work of %d clients", len(self._tasks))
            tasks = list(self._tasks.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
