"""The ordered group-commit writer, with its spool.

Every write of a process (message saves, ack deletes, re-keys) goes through one
FIFO queue drained by one task, so within a process a delete can never overtake the
insert it deletes. Group commit: a store round trip carries whatever was queued when
it started (up to ``batch_size`` ops), and waits for more only while other active
clients may send some (``exhook.group_commit``): a lone publisher pays one round
trip, a busy service makes few, full ones. What becomes of each op is its
``exhook.batches.Outcome``.

Spool mode. A failed store write is tried again (backoff with jitter) for as long as
its callers can wait: until one of them needs its answer (``spill``, at a publish's
deadline), until it has failed for ``spill_after_s`` (acks have no caller waiting),
until too many ops pile up (``max_pending``), or until the writer closes. A write that
hangs counts as failed once it has not returned within ``spill_after_s``, and is given
up at once when spool mode starts. Then the unwritten ops (the batch in flight first,
then the queue) go to the spool, and from then on every new op too, in order, until
the drainer (``exhook.drainer``) has moved the whole spool into the store; then the
writer writes to the store directly again. Ops are idempotent, so an op both written
late (a write given up may still land) and spooled is applied twice without harm,
except that such a late save can come back after its delete: the message is then
replayed once more (at least once, never lost).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from exhook.batches import BatchWriter, Entry, Outcome, identity
from exhook.deadlines import Deadlines
from exhook.drainer import SpoolDrainer
from exhook.group_commit import ACTIVE_S, GAP_S, ActiveSources, others_may_come
from exhook.metrics import Metrics
from exhook.spool import Spool, SpoolError, op_size
from storage.base import Store, StoreError
from storage.errors import one_line
from storage.model import SaveMessage, WriteOp
from storage.ratelog import RateLimitedLog
from storage.retry import Backoff

__all__ = ["Entry", "OrderedWriter", "Outcome", "WriterClosed", "WriterSettings"]

log = logging.getLogger(__name__)

# A store write that has not returned after this long is abandoned (its ops go to
# the spool); the backends' own timeouts normally end it sooner.
STALL_AFTER_S = 30.0


class WriterClosed(Exception):
    """The writer is shutting down and takes no more ops."""


@dataclass(frozen=True, slots=True)
class WriterSettings:
    batch_size: int
    max_pending: int
    spool_max_bytes: int
    backoff: Backoff = Backoff(base=0.05, cap=2.0)
    stall_after_s: float = STALL_AFTER_S
    spill_after_s: float = 0.5  # publish_deadline: a failing batch goes to the spool after it
    linger_s: float = 0.0  # batch_time: the longest a partial batch waits for other clients' ops
    gap_s: float = GAP_S  # ... and for the next one
    active_window_s: float = ACTIVE_S  # a client is active while its last op is younger


@dataclass(slots=True)
class _Failing:
    since: float
    error: str


class OrderedWriter:
    def __init__(self, store: Store, spool: Spool, metrics: Metrics, settings: WriterSettings,
                 on_health: Callable[[bool, str], None] = lambda ok, reason: None) -> None:
        self._store = store
        self._spool = spool
        self._metrics = metrics
        self._cfg = settings
        self._on_health = on_health
        self._batches = BatchWriter(store, spool, metrics)
        self._queue: deque[Entry] = deque()
        self._in_flight: list[Entry] = []
        self._in_flight_since: float | None = None
        self._has_work = asyncio.Event()
        self._direct_idle = asyncio.Event()
        self._direct_idle.set()
        self._idle = asyncio.Event()
        self._progress = asyncio.Event()  # a batch ended or the mode changed (caught_up)
        self._spool_lock = asyncio.Lock()
        self._spill_wanted = asyncio.Event()  # wakes a batch waiting to try the store again
        self._write_timeout: asyncio.Timeout | None = None  # of the direct write in flight
        self._spooling = spool.count > 0  # an earlier run left ops: they go first
        self._closing = False
        self._failing: _Failing | None = None
        self._logs = RateLimitedLog()
        self._lost = 0
        self._spool_shown = (-1, -1)
        self._active = ActiveSources(settings.active_window_s)
        self._drainer: asyncio.Task[None] | None = None
        # one timer for all waiting callers' deadlines, not one per publish
        self._deadlines = Deadlines(self.spill)
        self._run_task: asyncio.Task[Any] | None = None
        self._update_gauges()

    # -- what callers see -------------------------------------------------------------
    @property
    def spooling(self) -> bool:
        return self._spooling

    def problem(self) -> str:
        """Why writes are not healthy ("" when they are): for readiness."""
        since = self._in_flight_since
        if since is not None and time.monotonic() - since > self._cfg.stall_after_s / 2:
            return f"writer stalled: a {self._store.name} write has not returned for over " \
                   f"{self._cfg.stall_after_s / 2:.0f} s"
        if self._failing is not None:
            where = "spool draining behind a broken store" if self._spooling else "store writes failing"
            return f"{where}: {self._failing.error}"
        return ""

    def submit(self, op: WriteOp, source: str = "", spill_in: float | None = None) -> Entry:
        """Queue ``op`` from client ``source``; its entry's ``done`` resolves with the
        outcome. ``spill_in``: a caller waits for it; if the store has not taken it
        within that many seconds, it goes to the spool (``spill``)."""
        if self._closing:
            raise WriterClosed
        loop = asyncio.get_running_loop()
        entry = Entry(op, loop.create_future(), source=source, caller_waits=spill_in is not None)
        if spill_in is not None:
            self._deadlines.add(entry, loop.time() + spill_in)
        self._active.note(source)
        self._queue.append(entry)
        self._has_work.set()
        self._idle.clear()
        if not self._spooling and len(self._queue) > self._cfg.max_pending:
            # memory is bounded: a store that cannot keep up sends the backlog to disk
            self._start_spooling()
        if len(self._queue) > self._cfg.batch_size:
            # a backlog: the gauge must show it growing (otherwise each batch updates it)
            self._metrics.pending_writes.set(len(self._queue) + len(self._in_flight))
        return entry

    async def spill(self, entry: Entry) -> None:
        """Make ``entry`` durable now: it (and everything queued or in flight before
        it) goes to the spool. For a caller whose deadline is near."""
        if entry.settled:
            return
        if not self._spooling:
            log.warning("store %s slower than the publish deadline: spooling writes", self._store.name,
                        extra={"event": "spooling", "backend": self._store.name})
        await self._spool_pending(start=True)

    async def caught_up(self, timeout: float) -> None:
        """Wait, at most ``timeout`` s, until the ops queued so far are in the store:
        settled (ops settle in queue order), and, if the writer is spooling, drained
        from the spool. Woken by each batch's end (the last op's ``done`` may have
        been cancelled by its caller)."""
        last = self._queue[-1] if self._queue else (self._in_flight[-1] if self._in_flight else None)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while (last is not None and not last.settled) or self._spooling:
                    self._progress.clear()
                    await self._progress.wait()

    async def drained(self) -> None:
        """Wait until every op queued so far is in the store (tests, benchmarks)."""
        while not self._idle_now():
            self._idle.clear()
            await self._idle.wait()

    def _idle_now(self) -> bool:
        return not (self._queue or self._in_flight or self._spooling)

    # -- direct mode ---------------------------------------------------------------------
    async def run(self) -> None:
        """The writer's loop (run it as a supervised task); returns once closed and empty."""
        self._run_task = asyncio.current_task()
        if self._spooling:
            self._start_drainer()
        while True:
            if self._queue:
                if self._spooling:
                    await self._spool_pending()
                else:
                    await self._write_direct()
                continue
            if self._closing:
                return
            self._has_work.clear()
            await self._has_work.wait()

    async def _write_direct(self) -> None:
        take = min(self._cfg.batch_size, len(self._queue))
        batch = [self._queue.popleft() for _ in range(take)]
        self._in_flight = batch
        self._in_flight_since = time.monotonic()
        self._direct_idle.clear()
        try:
            if len(batch) < self._cfg.batch_size and self._cfg.linger_s > 0:
                await self._linger(batch)
            await self._write_until_done(batch)
        except Exception:
            # an unexpected failure of this loop (it restarts): the batch goes back first
            self._queue.extendleft(reversed([e for e in batch if not e.settled]))
            raise
        finally:
            self._in_flight = []
            self._in_flight_since = None
            self._direct_idle.set()
            self._update_gauges()

    async def _linger(self, batch: list[Entry]) -> None:
        """Let a partial batch take the ops other active clients send meanwhile
        (``exhook.group_commit``): each next op within ``gap_s``, at most ``linger_s`` in all.
        A batch whose callers do not wait (acks, re-keys) takes whatever comes, from any
        client: nobody's answer is late for it, and a subscriber acking a replay one
        message at a time would otherwise cost a commit per message."""
        sources = {entry.source for entry in batch}
        waited_for = any(entry.caller_waits for entry in batch)
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self._cfg.linger_s
        while len(batch) < self._cfg.batch_size and not self._spooling \
                and (not waited_for or others_may_come(self._active.count(), len(sources))):
            if not self._queue:
                now = loop.time()
                if now >= give_up:
                    return
                # a bare timer, not asyncio.timeout: this runs for most ops of a busy service
                self._has_work.clear()
                timer = loop.call_at(min(now + self._cfg.gap_s, give_up), self._has_work.set)
                try:
                    await self._has_work.wait()
                finally:
                    timer.cancel()
                if not self._queue:
                    return  # nothing came within the gap
                continue
            entry = self._queue.popleft()
            batch.append(entry)  # the same list as _in_flight: a spill sees it
            sources.add(entry.source)
            waited_for = waited_for or entry.caller_waits

    async def _write_until_done(self, batch: list[Entry]) -> None:
        """Write the batch, trying again after a failure for as long as its callers
        can wait (see the module docstring); then the spool takes over."""
        failures = 0
        first_failure = 0.0
        while True:
            started = time.monotonic()
            try:
                await self._write_in_time(batch, started)
            except Exception as exc:  # the store is down or failing
                self._note_failure(exc)
                failures += 1
                first_failure = first_failure or started
                waited = time.monotonic() - first_failure
                if not self._spooling and not self._closing and waited < self._cfg.spill_after_s:
                    self._spill_wanted.clear()
                    with contextlib.suppress(TimeoutError):
                        pause = min(self._cfg.backoff.delay(failures), self._cfg.spill_after_s - waited)
                        async with asyncio.timeout(pause):
                            await self._spill_wanted.wait()
                    continue
                await self._spool_pending(start=True)
                return
            self._note_success()
            return

    async def _write_in_time(self, batch: list[Entry], started: float) -> None:
        """One store write (``started``: its ``time.monotonic()``), given up (cancelled)
        when it has not returned within ``spill_after_s`` (a hung store must not hold
        acks, which no caller's deadline spills, in memory until the backend's own
        timeout), or as soon as spool mode starts (``_start_spooling``)."""
        try:
            async with asyncio.timeout(min(self._cfg.spill_after_s, self._cfg.stall_after_s)) as limit:
                self._write_timeout = limit
                await self._batches.write(batch)
        except TimeoutError:
            raise StoreError(f"{self._store.name}: write not answered within "
                             f"{time.monotonic() - started:.2f} s") from None
        finally:
            self._write_timeout = None

    # -- spool mode ----------------------------------------------------------------------
    async def _spool_pending(self, start: bool = False) -> None:
        """Move the unwritten ops (in flight first, then queued) into the spool;
        ``start``: enter spool mode. Shielded: a caller cancelled meanwhile (a
        publish whose broker gave up) must not leave ops taken but not settled."""
        await asyncio.shield(self._spool_pending_now(start))

    def _start_spooling(self) -> None:
        """Spool mode: new ops go to the spool. A direct write still in flight is given
        up at once (its batch is spooled with the queue): otherwise the loop would stay
        in it, and every op arriving meanwhile would wait for its own deadline."""
        self._spooling = True
        self._spill_wanted.set()
        if self._write_timeout is not None and not self._write_timeout.expired():
            # (an expired one is ending the write already, and cannot be rescheduled)
            self._write_timeout.reschedule(asyncio.get_running_loop().time())

    async def _spool_pending_now(self, start: bool) -> None:
        # the mode only changes under the spool lock, so the drainer's switch back to
        # direct writes cannot interleave with this
        async with self._spool_lock:
            if start:
                self._start_spooling()
            if not self._spooling:
                return  # the spool was drained meanwhile: the queue is written directly
            queued = list(self._queue)
            self._queue.clear()
            try:
                await self._append([e for e in self._in_flight if not e.settled] + queued)
            except BaseException:
                # not SpoolError (handled inside): a bug must not drop the queued ops
                # nobody has spooled yet; they go back first (the batch in flight stays)
                self._queue.extendleft(reversed([e for e in queued if not e.settled]))
                raise
        self._update_gauges()
        self._start_drainer()

    async def _append(self, entries: list[Entry]) -> None:
        room = self._cfg.spool_max_bytes - self._spool.bytes
        accepted: list[Entry] = []
        for entry in entries:
            if entry.settled:
                continue
            size = op_size(entry.op)
            # acks, re-keys are small and never refused: losing one would replay a message again
            if isinstance(entry.op, SaveMessage) and size > room:
                self._refuse(entry, "spool full")
                continue
            room -= size
            accepted.append(entry)
        if not accepted:
            return
        try:
            await self._spool.append([e.op for e in accepted])
        except SpoolError as exc:
            if len(accepted) == 1:
                self._refuse(accepted[0], one_line(exc))
                return
            # one op the spool cannot hold must not cost the others their place: one by one
            for entry in accepted:
                await self._append([entry])
            return
        self._metrics.spooled.inc(len(accepted))
        for entry in accepted:
            entry.settle(Outcome.SPOOLED)

    def _refuse(self, entry: Entry, why: str) -> None:
        if self._closing:
            self._lost += 1  # the exit status says so
        entry.settle(Outcome.REFUSED)
        if not isinstance(entry.op, SaveMessage):
            self._metrics.writes_dropped.inc()
        count = self._logs.note("refused")
        if count:
            msgid, topic = identity(entry.op)
            log.error("write NOT stored: %s", why, extra={"event": "write_refused", "reason": why, "msgid": msgid,
                                                          "topic": topic[:200], "refused_since_last_line": count})

    def _start_drainer(self) -> None:
        if self._drainer is None or self._drainer.done():
            drainer = SpoolDrainer(
                self._spool, self._batches, self._spool_lock, self._metrics, batch_size=self._cfg.batch_size,
                backoff=self._cfg.backoff, stall_after_s=self._cfg.stall_after_s, on_empty=self._spool_emptied,
                on_failure=self._note_failure, on_success=self._note_success, on_change=self._update_gauges)
            self._drainer = asyncio.create_task(drainer.run(self._direct_idle.wait()), name="spool-drainer")

    def _spool_emptied(self) -> bool:
        """The drainer found the spool empty (under the spool lock): nothing older is
        pending, so the queue may go to the store directly."""
        if self._queue:
            return False  # the writer task is moving them in; the drainer takes them next
        self._spooling = False
        log.warning("spool empty: writing to %s directly again", self._store.name,
                    extra={"event": "spool_drained", "backend": self._store.name})
        self._has_work.set()
        self._update_gauges()
        return True

    # -- health ----------------------------------------------------------------------------
    def _note_failure(self, exc: Exception) -> None:
        backend = self._store.name
        if self._failing is None:
            self._failing = _Failing(time.monotonic(), one_line(exc))
            log.error("store %s write failed: retrying; ops that cannot wait go to the spool", backend,
                      extra={"event": "store_write_failed", "backend": backend, "error": one_line(exc)})
            self._on_health(False, self.problem())
            return
        self._failing.error = one_line(exc)
        count = self._logs.note("failing")
        if count:
            log.error("store %s still failing", backend,
                      extra={"event": "store_write_failing", "backend": backend, "failures_since_last_line": count,
                             "spooled": self._spool.count, "error": one_line(exc)})

    def _note_success(self) -> None:
        if self._failing is None:
            return
        log.warning("store %s is writable again", self._store.name,
                    extra={"event": "store_recovered", "backend": self._store.name,
                           "failing_for_s": round(time.monotonic() - self._failing.since, 1)})
        self._failing = None
        self._on_health(True, "")

    def _update_gauges(self) -> None:
        """After each batch (written or spooled) and each change of mode."""
        self._progress.set()
        if self._idle_now():
            self._idle.set()
        self._metrics.pending_writes.set(len(self._queue) + len(self._in_flight))
        spool = (self._spool.count, self._spool.bytes)
        if spool != self._spool_shown:  # once per batch, and the spool rarely changes
            self._spool_shown = spool
            self._metrics.spool_pending.set(spool[0])
            self._metrics.spool_bytes.set(spool[1])

    # -- shutdown -------------------------------------------------------------------------
    async def close(self, timeout: float) -> int:
        """Stop taking ops; write what is queued to the store for at most ``timeout``
        s (draining the spool too), then spool what is left. Returns how many ops were
        lost (neither stored nor spooled: the spool was full or failed)."""
        self._closing = True
        self._has_work.set()
        self._spill_wanted.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self.drained()
        # whatever is still queued or in flight goes to the spool before the tasks stop
        await self._spool_pending(start=bool(self._queue or self._in_flight))
        await self._deadlines.close()
        for task in (self._drainer, self._run_task):  # a write still in flight is abandoned
            if task is not None and not task.done() and task is not asyncio.current_task():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._spool.count:
            log.warning("shutdown: %d write ops stay in the spool for the next start", self._spool.count,
                        extra={"event": "spool_kept", "ops": self._spool.count, "path": str(self._spool.path)})
        return self._lost
