"""Per-client ordered background work.

EMQX blocks a client while any of its hooks runs, so the service answers at once
and does the slow part (database reads, REST calls, replays) here. Jobs of one
client run one after another in the order their hooks arrived; jobs of different
clients run concurrently, as many at a time as ``exhook.pacing.AdaptiveLimit``
allows: none while hook calls keep the service busy (a reconnect storm), more while
it keeps up. A job waiting for its turn costs an entry in two deques, no task, so a
storm of ten thousand restores waits cheaply.

A running job that only waits (for the broker to register its client, between the
tries of a 404, for a restore's turn: ``subscribed_calls.py``) steps out of its slot
for the wait (``outside_slot``): a few clients that left during their connect, each
waiting seconds for a broker that will never know them, would otherwise hold every
slot and stall all other clients' work. The job keeps its place in its client's order
(its client's next job still waits for it) and takes a slot again to go on: ahead of
the jobs that have not started (behind other jobs going on), so that in a storm a
restore that waited a moment for the broker finishes before yet another client's
restore begins, instead of after all of them. At most a thousand jobs are out at
once (each keeps its task); any more wait in their slot. In a reconnect storm
restores waiting for a turn fill that room, and the others' waits for the broker's
calls then hold their slots, which slows the start of further restores: measured,
that keeps the broker's calls answered sooner at the same restore rate than a room of
their own for the turn waits did (subscribed_calls.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass

from exhook.metrics import Metrics
from exhook.pacing import AdaptiveLimit
from storage.errors import one_line
from storage.ratelog import RateLimitedLog

log = logging.getLogger(__name__)

Job = Callable[[], Awaitable[None]]
# at most this many jobs wait outside their slot at once (each keeps its task); any
# more wait in their slot, as before
_MAX_STEPPED_OUT = 1000


@dataclass(slots=True, eq=False)
class _RunningJob:
    queues: ClientQueues
    clientid: str
    task: asyncio.Task[None] | None
    out: bool = False  # waiting outside its slot


# the job this task runs, so that a wait deep inside it (a retry's pause) can step out
# of its slot without every caller on the way passing the queue down
_JOB: ContextVar[_RunningJob | None] = ContextVar("client_job", default=None)


@contextlib.asynccontextmanager
async def outside_slot() -> AsyncIterator[bool]:
    """Wrap a wait of a running job that needs no slot: other clients' jobs may use it
    meanwhile, and the job waits for one again (paced as any job) before it goes on.
    Anywhere else (outside a client job, in a task the job started, nested) it only
    runs the body. Yields whether the body runs without holding a slot (False: in a
    task the job started, or too many jobs are out already), so that a wait for
    something another job holds can tell whether it could block that job's slot."""
    job = _JOB.get()
    if job is None or job.out:
        yield True
        return
    if job.task is not asyncio.current_task() or not job.queues._step_out(job):
        yield False
        return
    try:
        yield True
    except BaseException:
        # cancelled (shutdown) or failed: the exception goes on at once, without waiting
        # for a slot, and the job counts as holding one again (its end gives it back)
        job.queues._back_in(job)
        raise
    await job.queues._step_in(job)


async def sleep_outside_slot(seconds: float) -> None:
    """``asyncio.sleep`` for a retry's pause inside a client job (see ``outside_slot``)."""
    async with outside_slot():
        await asyncio.sleep(seconds)


class ClientQueues:
    def __init__(self, metrics: Metrics, max_per_client: int = 1000, slots: AdaptiveLimit | None = None,
                 max_stepped_out: int = _MAX_STEPPED_OUT) -> None:
        self._metrics = metrics
        self._max_per_client = max_per_client
        self._max_out = max_stepped_out
        self._out = 0  # jobs waiting outside their slot
        self._slots = slots or AdaptiveLimit()
        self._slots.on_room = self._dispatch
        self._jobs: dict[str, deque[tuple[str, Job]]] = {}
        # clients whose next job waits for a slot, with the time it started waiting (the
        # third field: a future, in _resuming only)
        self._ready: deque[tuple[float, str, asyncio.Future[None] | None]] = deque()
        # running jobs that wait to take a slot again (see outside_slot): they go first
        self._resuming: deque[tuple[float, str, asyncio.Future[None] | None]] = deque()
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
            # a client subscribing to thousands of filters at once fills its queue: one
            # line a minute, not one per job
            count = self._refusals.note("full")
            if count:
                log.warning("client job queue full: job dropped", extra={
                    "event": "job_dropped", "clientid": clientid[:200], "queued": len(jobs), "job": what[:200],
                    "dropped_since_last_line": count})
            return False
        jobs.append((what, job))
        if len(jobs) == 1:  # the client had nothing queued or running: it waits for a slot now
            self._idle.clear()
            self._ready.append((asyncio.get_running_loop().time(), clientid, None))
            self._dispatch()
        return True

    def merge_into_last(self, clientid: str, merge: Callable[[Job], bool]) -> bool:
        """Offer new work to the client's last queued job, if that job has not started:
        ``merge`` takes it into the job (True) or declines (False). Order is kept: what
        merges runs after everything queued before that job and before anything after."""
        jobs = self._jobs.get(clientid)
        if not jobs or self._closing or (len(jobs) == 1 and clientid in self._running):
            return False
        return merge(jobs[-1][1])

    def _dispatch(self) -> None:
        """Start the next clients' jobs while the limit allows."""
        slots = self._slots
        while (self._resuming or self._ready) and not self._stopped:
            ready = self._resuming or self._ready
            waiting_since, clientid, resume = ready[0]
            if resume is not None and resume.cancelled():
                ready.popleft()  # its job was cancelled meanwhile (_step_in cleans up)
                continue
            if not slots.may_start(asyncio.get_running_loop().time() - waiting_since):
                return
            ready.popleft()
            slots.started()
            if resume is not None:
                resume.set_result(None)
            else:
                self._running[clientid] = asyncio.create_task(self._run_next(clientid), name=f"client:{clientid}")

    async def _run_next(self, clientid: str) -> None:
        jobs = self._jobs[clientid]
        what, job = jobs[0]
        _JOB.set(_RunningJob(self, clientid, asyncio.current_task()))  # this task's own context
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
                self._ready.append((asyncio.get_running_loop().time(), clientid, None))
            else:
                del self._jobs[clientid]
            self._dispatch()
            if not self._jobs:
                self._slots.idle()
                self._idle.set()

    def _step_out(self, job: _RunningJob) -> bool:
        """Give the job's slot to others (see ``outside_slot``); False if it keeps it."""
        if job.out or self._out >= self._max_out:
            return False
        job.out = True
        self._out += 1
        self._slots.released()
        self._dispatch()
        return True

    async def _step_in(self, job: _RunningJob) -> None:
        """Wait for a slot again, ahead of the jobs that have not started yet."""
        loop = asyncio.get_running_loop()
        resume: asyncio.Future[None] = loop.create_future()
        entry = (loop.time(), job.clientid, resume)
        self._resuming.append(entry)
        self._dispatch()
        try:
            await resume
        finally:
            if resume.cancelled():  # cancelled (shutdown) before it got a slot
                with contextlib.suppress(ValueError):
                    self._resuming.remove(entry)
                self._slots.started()  # what the job's end gives back
            self._mark_in(job)

    def _back_in(self, job: _RunningJob) -> None:
        """The job ends without waiting for a slot: count it as holding one again, so
        that its end (``_run_next``) gives back what it took."""
        self._slots.started()
        self._mark_in(job)

    def _mark_in(self, job: _RunningJob) -> None:
        job.out = False
        self._out -= 1

    @property
    def waiting(self) -> bool:
        """Is a client's job waiting for a slot (held back by the pacing)?"""
        return bool(self._ready or self._resuming)

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
            self._resuming.clear()
            self._jobs.clear()
        await self._slots.close()
