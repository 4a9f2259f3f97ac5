"""Per-client ordered background work.

EMQX blocks a client while any of its hooks runs, so the service answers at once
and does the slow part (database reads, REST calls, replays) here. Jobs of one
client run one after another in the order their hooks arrived; jobs of different
clients run concurrently, as many at a time as ``exhook.pacing.AdaptiveLimit``
allows: none while hook calls keep the service busy (a reconnect storm), more while
it keeps up. A job waiting for its turn costs an entry in two deques, no task, so a
storm of ten thousand restores waits cheaply.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable

from exhook.metrics import Metrics
from exhook.pacing import AdaptiveLimit
from exhook.ratelog import RateLimitedLog
from storage.errors import one_line

log = logging.getLogger(__name__)

Job = Callable[[], Awaitable[None]]


class ClientQueues:
    def __init__(self, metrics: Metrics, max_per_client: int = 1000, slots: AdaptiveLimit | None = None) -> None:
        self._metrics = metrics
        self._max_per_client = max_per_client
        self._slots = slots or AdaptiveLimit()
        self._slots.on_room = self._dispatch
        self._jobs: dict[str, deque[tuple[str, Job]]] = {}
        # clients whose next job waits for a slot, with the time it started waiting
        self._ready: deque[tuple[float, str]] = deque()
        self._running: dict[str, asyncio.Task[None]] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        self._refusals = RateLimitedLog()
        self._stopped = False  # shutdown gave up waiting: start nothing more

    def note_connect(self) -> None:
        """A hook holding a client's CONNACK arrived: background work waits while they
        keep coming (a reconnect storm), see ``AdaptiveLimit``."""
        self._slots.note_connect()

    def submit(self, clientid: str, what: str, job: Job) -> bool:
        """Queue ``job`` behind the client's earlier jobs. False if refused
        (shutting down, or the client has too much queued)."""
        if self._closing:
            # shutting down: the client's hook was answered, its work is not done (a later
            # connect restores and replays again); counted, and one line a minute
            self._metrics.jobs_dropped.inc()
            count = self._refusals.note("closing")
            if count:
                log.warning("shutting down: background job not started", extra={
                    "event": "job_dropped", "clientid": clientid[:200], "job": what[:200],
                    "dropped_since_last_line": count})
            return False
        jobs = self._jobs.setdefault(clientid, deque())
        if len(jobs) >= self._max_per_client:
            self._metrics.jobs_dropped.inc()
            log.warning("client job queue full: job dropped",
                        extra={"event": "job_dropped", "clientid": clientid, "queued": len(jobs), "job": what})
            return False
        jobs.append((what, job))
        if len(jobs) == 1:  # the client had nothing queued or running: it waits for a slot now
            self._idle.clear()
            self._ready.append((asyncio.get_running_loop().time(), clientid))
            self._dispatch()
        return True

    def _dispatch(self) -> None:
        """Start the next clients' jobs while the limit allows."""
        ready, slots = self._ready, self._slots
        while ready and not self._stopped:
            waiting_since, clientid = ready[0]
            if not slots.may_start(asyncio.get_running_loop().time() - waiting_since):
                return
            ready.popleft()
            slots.started()
            self._running[clientid] = asyncio.create_task(self._run_next(clientid), name=f"client:{clientid}")

    async def _run_next(self, clientid: str) -> None:
        jobs = self._jobs[clientid]
        what, job = jobs[0]
        try:
            await job()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # one line with the cause (a 401, a store error), no traceback
            log.error("client job failed: %s", one_line(exc),
                      extra={"event": "job_failed", "clientid": clientid, "job": what})
        finally:
            jobs.popleft()
            del self._running[clientid]
            self._slots.finished()
            if jobs:  # its next job queues behind the clients already waiting
                self._ready.append((asyncio.get_running_loop().time(), clientid))
            else:
                del self._jobs[clientid]
            self._dispatch()
            if not self._jobs:
                self._slots.idle()
                self._idle.set()

    @property
    def waiting(self) -> bool:
        """Is a client's job waiting for a slot (held back by the pacing)?"""
        return bool(self._ready)

    async def idle(self) -> None:
        """Wait until no job is queued or running (tests, shutdown)."""
        await self._idle.wait()

    async def close(self, timeout: float) -> None:
        """Refuse new jobs, let queued ones finish for ``timeout`` s, cancel the rest."""
        self._closing = True
        try:
            await asyncio.wait_for(self.idle(), timeout)
        except TimeoutError:
            log.warning("shutdown: cancelling background work of %d clients", len(self._jobs))
            self._stopped = True
            tasks = list(self._running.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._ready.clear()
            self._jobs.clear()
        await self._slots.close()
