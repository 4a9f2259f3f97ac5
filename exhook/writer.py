"""The ordered group-commit writer, with its spool.

Every write of a process (message saves, ack deletes, re-keys) goes through one
FIFO queue drained by one task, so a delete can never overtake the insert it
deletes. Group commit: a store round trip carries whatever was queued when it
started (up to ``batch_size`` ops), and waits for more only while other active
clients may send some (``exhook.group_commit``): a lone publisher pays one round
trip, a busy service makes few, full ones.

Outcomes. Every op ends in exactly one of: STORED (the store has it), SPOOLED (it
is in the local spool on disk, the store gets it later), REJECTED (the store refuses
it for good: set aside, logged, counted; the other ops of its batch are written)
or REFUSED (neither the store nor the spool could take it: not stored, counted).

Spool mode. A failed store write is tried again (backoff with jitter) for as long
as its callers can wait. When a caller's deadline is about to pass (``spill``), too
many ops pile up (``max_pending``), or the writer closes, the unwritten ops (the
batch in flight first, then the queue) go to the spool, and from then on every new
op too, in order, until a drainer has moved the whole spool into the store; then the
writer writes to the store directly again. Ops are idempotent, so an op that was both in a
write that succeeded late and in the spool is applied twice without harm.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from exhook.group_commit import ACTIVE_S, GAP_S, ActiveSources, others_may_come
from exhook.metrics import Metrics
from exhook.spool import Spool, SpoolError, op_size
from storage.base import Store, StoreError, WriteRejected
from storage.errors import one_line
from storage.model import DeleteMessage, RekeyMessage, SaveMessage, WriteOp
from storage.retry import Backoff

log = logging.getLogger(__name__)

# A store write that has not returned after this long is abandoned (its ops go to
# the spool); the backends' own timeouts normally end it sooner.
STALL_AFTER_S = 30.0
# A spooled op that keeps failing on its own while the store answers pings is set
# aside (as "refused"): the drain goes one op at a time after _ONE_BY_ONE_AFTER
# failures, and gives an op up after _SET_ASIDE_AFTER.
_ONE_BY_ONE_AFTER = 3
_SET_ASIDE_AFTER = 8


class Outcome(enum.Enum):
    STORED = "stored"
    SPOOLED = "spooled"
    REJECTED = "rejected"
    REFUSED = "refused"


class WriterClosed(Exception):
    """The writer is shutting down and takes no more ops."""


@dataclass(slots=True, eq=False)
class Entry:
    """One op on its way. ``outcome`` is set once it is settled, and ``done`` (if
    any) resolved with it; a caller that stops waiting at its deadline may cancel
    ``done`` and still read ``outcome`` after ``OrderedWriter.spill``. ``seq`` is
    the op's row in the spool while it is drained from there."""

    op: WriteOp
    done: asyncio.Future[Outcome] | None = None
    seq: int | None = None
    outcome: Outcome | None = None
    source: str = ""  # the client it came from (group commit waits only for others)

    @property
    def settled(self) -> bool:
        return self.outcome is not None

    def settle(self, outcome: Outcome) -> None:
        self.outcome = outcome
        if self.done is not None and not self.done.done():
            self.done.set_result(outcome)


@dataclass(frozen=True, slots=True)
class WriterSettings:
    batch_size: int
    max_pending: int
    spool_max_bytes: int
    backoff: Backoff = Backoff(base=0.05, cap=2.0)
    stall_after_s: float = STALL_AFTER_S
    linger_s: float = 0.0  # batch_time: the longest a partial batch waits for other clients' ops
    gap_s: float = GAP_S  # ... and for the next one
    active_window_s: float = ACTIVE_S  # a client is active while its last op is younger


class OrderedWriter:
    def __init__(self, store: Store, spool: Spool, metrics: Metrics, settings: WriterSettings,
                 on_health: Callable[[bool, str], None] = lambda ok, reason: None) -> None:
        self._store = store
        self._spool = spool
        self._metrics = metrics
        self._cfg = settings
        self._on_health = on_health
        self._queue: deque[Entry] = deque()
        self._in_flight: list[Entry] = []
        self._in_flight_since: float | None = None
        self._has_work = asyncio.Event()
        self._direct_idle = asyncio.Event()
        self._direct_idle.set()
        self._idle = asyncio.Event()
        self._spool_lock = asyncio.Lock()
        self._spill_wanted = asyncio.Event()  # wakes a batch waiting to try the store again
        self._spooling = spool.count > 0  # an earlier run left ops: they go first
        self._closing = False
        self._failing: _Failing | None = None
        self._refusals = _RateLimitedLog()
        self._lost = 0
        self._spool_shown = (-1, -1)
        self._active = ActiveSources(settings.active_window_s)
        self._single_seq: int | None = None  # the op a one-at-a-time drain keeps failing on, and how often
        self._single_failures = 0
        self._drainer: asyncio.Task[None] | None = None
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

    def submit(self, op: WriteOp, source: str = "") -> Entry:
        """Queue ``op`` from client ``source``; its entry's ``done`` resolves with the outcome."""
        if self._closing:
            raise WriterClosed
        entry = Entry(op, asyncio.get_running_loop().create_future(), source=source)
        self._active.note(source)
        self._queue.append(entry)
        self._has_work.set()
        self._idle.clear()
        if not self._spooling and len(self._queue) > self._cfg.max_pending:
            # memory is bounded: a store that cannot keep up sends the backlog to disk
            self._spooling = True
            self._has_work.set()
            self._spill_wanted.set()
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
        finally:
            self._in_flight = []
            self._in_flight_since = None
            self._direct_idle.set()
            self._update_gauges()

    async def _linger(self, batch: list[Entry]) -> None:
        """Let a partial batch take the ops other active clients send meanwhile
        (``exhook.group_commit``): each next op within ``gap_s``, at most ``linger_s`` in all."""
        sources = {entry.source for entry in batch}
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self._cfg.linger_s
        while len(batch) < self._cfg.batch_size and not self._spooling \
                and others_may_come(self._active.count(), len(sources)):
            if not self._queue:
                remaining = give_up - loop.time()
                if remaining <= 0:
                    return
                self._has_work.clear()
                try:
                    async with asyncio.timeout(min(self._cfg.gap_s, remaining)):
                        await self._has_work.wait()
                except TimeoutError:
                    return
                continue
            entry = self._queue.popleft()
            batch.append(entry)  # the same list as _in_flight: a spill sees it
            sources.add(entry.source)

    async def _write_until_done(self, batch: list[Entry]) -> None:
        """Write the batch, trying again after a failure for as long as its callers
        can wait: when one of them needs an answer (``spill``), too much piles up
        behind it, or the writer closes, the spool takes over."""
        failures = 0
        while True:
            try:
                async with asyncio.timeout(self._cfg.stall_after_s):
                    await self._write_isolating(batch)
            except Exception as exc:  # the store is down or failing
                self._note_failure(exc)
                failures += 1
                if not self._spooling and not self._closing:
                    self._spill_wanted.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self._cfg.backoff.delay(failures)):
                            await self._spill_wanted.wait()
                if self._spooling or self._closing or all(e.settled for e in batch):
                    await self._spool_pending(start=True)
                    return
                continue
            self._note_success()
            return

    async def _write_isolating(self, entries: list[Entry]) -> None:
        """Write ``entries`` in order; an op the store refuses for good is set aside
        and the others are written (the batch is split until the bad op is found).
        A transient failure propagates, leaving unwritten entries unsettled."""
        entries = [e for e in entries if not e.settled]
        if not entries:
            return
        started = time.perf_counter()
        try:
            await self._store.write([e.op for e in entries])
        except WriteRejected as exc:
            await self._isolate(entries, exc)
            return
        except (StoreError, OSError, TimeoutError):
            raise  # the store is down, slow or unusable: not the ops' fault
        except Exception as exc:
            # A backend that fails on data without saying so (a driver's TypeError,
            # OverflowError...) is treated as refusing some op of the batch: find it.
            await self._isolate(entries, WriteRejected("refused", one_line(exc)))
            return
        self._metrics.write_latency.observe(time.perf_counter() - started)
        self._metrics.batch_size.observe(len(entries))
        _count_done(self._metrics, entries)
        for entry in entries:
            entry.settle(Outcome.STORED)

    async def _isolate(self, entries: list[Entry], exc: WriteRejected) -> None:
        if exc.index is not None and 0 <= exc.index < len(entries):
            await self._set_aside(entries[exc.index], exc)
            await self._write_isolating(entries[: exc.index] + entries[exc.index + 1:])
        elif len(entries) == 1:
            await self._set_aside(entries[0], exc)
        else:
            middle = len(entries) // 2
            await self._write_isolating(entries[:middle])
            await self._write_isolating(entries[middle:])

    async def _set_aside(self, entry: Entry, exc: WriteRejected) -> None:
        op = entry.op
        backend = self._store.name
        self._metrics.write_rejected(backend, exc.reason)
        msgid, topic = _identity(op)
        log.error("%s refused a write for good: set aside", backend,
                  extra={"event": "write_rejected", "backend": backend, "op": type(op).__name__, "msgid": msgid,
                         "topic": topic[:200], "reason": exc.reason, "error": exc.detail[:300]})
        try:
            await self._spool.set_aside(backend, exc.reason, exc.detail, op)
        except SpoolError as spool_exc:  # the op is counted and logged above; keeping a copy is a courtesy
            log.error("cannot keep the refused op in the spool's set_aside table: %s", spool_exc)
        entry.settle(Outcome.REJECTED)

    # -- spool mode ----------------------------------------------------------------------
    async def _spool_pending(self, start: bool = False) -> None:
        """Move the unwritten ops (in flight first, then queued) into the spool;
        ``start``: enter spool mode (the mode only changes under the spool lock, so
        the drainer's switch back to direct writes cannot interleave with this)."""
        async with self._spool_lock:
            if start:
                self._spooling = True
                self._spill_wanted.set()
            if not self._spooling:
                return  # the spool was drained meanwhile: the queue is written directly
            entries = [e for e in self._in_flight if not e.settled] + list(self._queue)
            self._queue.clear()
            await self._append(entries)
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
        count = self._refusals.note()
        if count:
            msgid, topic = _identity(entry.op)
            log.error("write NOT stored: %s", why, extra={"event": "write_refused", "reason": why, "msgid": msgid,
                                                          "topic": topic[:200], "refused_since_last_line": count})

    def _start_drainer(self) -> None:
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain(), name="spool-drainer")

    async def _drain(self) -> None:
        """Move the spool into the store, oldest first, until it is empty; then the
        writer writes directly again."""
        await self._direct_idle.wait()  # the batch in flight when spooling began lands first
        failures = 0
        while True:
            try:
                if not await self._drain_step(one_by_one=failures >= _ONE_BY_ONE_AFTER):
                    return
            except Exception as exc:  # the store, or the spool itself: keep trying, say why
                self._note_failure(exc)
                failures += 1
                await asyncio.sleep(self._cfg.backoff.delay(failures))
                continue
            failures = 0

    async def _drain_step(self, one_by_one: bool) -> bool:
        """Write the spool's oldest ops to the store; False once the spool is empty.
        After repeated failures it goes one op at a time, and an op that keeps failing
        on its own while the store answers pings is set aside: an op that breaks the
        store in a way it does not report as a refusal must not hold the rest."""
        async with self._spool_lock:
            if not self._spool.count:
                self._spooling = False  # nothing older is pending: the queue may go directly
                log.warning("spool empty: writing to %s directly again", self._store.name,
                            extra={"event": "spool_drained", "backend": self._store.name})
                self._has_work.set()
                self._update_gauges()
                return False
            head = await self._spool.head(1 if one_by_one else self._cfg.batch_size)
        entries = [Entry(item.op, seq=item.seq) for item in head]
        try:
            async with asyncio.timeout(self._cfg.stall_after_s):
                await self._write_isolating(entries)
        except Exception as exc:
            await self._forget_settled(entries)
            single = entries[0] if len(entries) == 1 and not entries[0].settled else None
            if single is None or not await self._keeps_failing(single):
                raise
            await self._set_aside(single, WriteRejected("refused", one_line(exc)))
        await self._forget_settled(entries)
        self._note_success()
        self._metrics.spool_drained.inc(len(entries))
        return True

    async def _keeps_failing(self, entry: Entry) -> bool:
        # the same spool row failing again (entries are rebuilt from the spool every try)
        self._single_failures = self._single_failures + 1 if self._single_seq == entry.seq else 1
        self._single_seq = entry.seq
        return self._single_failures >= _SET_ASIDE_AFTER and await self._store_answers()

    async def _store_answers(self) -> bool:
        try:
            async with asyncio.timeout(5):
                await self._store.ping()
        except Exception:
            return False
        return True

    async def _forget_settled(self, entries: list[Entry]) -> None:
        settled = [e.seq for e in entries if e.settled and e.seq is not None]
        if settled:
            async with self._spool_lock:
                await self._spool.remove(settled)
            self._update_gauges()

    # -- health ----------------------------------------------------------------------------
    def _note_failure(self, exc: Exception) -> None:
        backend = self._store.name
        if self._failing is None:
            self._failing = _Failing(time.monotonic(), one_line(exc))
            log.error("store %s write failed: spooling until it is back", backend,
                      extra={"event": "store_write_failed", "backend": backend, "error": one_line(exc)})
            self._on_health(False, self.problem())
            return
        self._failing.error = one_line(exc)
        self._failing.count += 1
        if self._failing.count % 50 == 0:
            log.error("store %s still failing", backend,
                      extra={"event": "store_write_failing", "backend": backend, "failures": self._failing.count,
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
        lost (neither stored nor spooled: only when the spool itself failed)."""
        self._closing = True
        self._has_work.set()
        try:
            async with asyncio.timeout(timeout):
                await self.drained()
        except TimeoutError:
            pass
        # whatever is still queued or in flight goes to the spool before the tasks stop
        await self._spool_pending(start=bool(self._queue or self._in_flight))
        for task in (self._drainer, self._run_task):  # a write still in flight is abandoned
            if task is not None and not task.done() and task is not asyncio.current_task():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._spool.count:
            log.warning("shutdown: %d write ops stay in the spool for the next start", self._spool.count,
                        extra={"event": "spool_kept", "ops": self._spool.count, "path": str(self._spool.path)})
        return self._lost


@dataclass(slots=True)
class _Failing:
    since: float
    error: str
    count: int = 1


class _RateLimitedLog:
    """At most one line a minute: ``note`` returns how many events the line to write
    now covers, or 0 when it must stay quiet."""

    def __init__(self, every_s: float = 60.0) -> None:
        self._every = every_s
        self._last = -every_s
        self._since = 0

    def note(self) -> int:
        self._since += 1
        now = time.monotonic()
        if now - self._last < self._every:
            return 0
        self._last = now
        count, self._since = self._since, 0
        return count


def _identity(op: WriteOp) -> tuple[str, str]:
    if isinstance(op, SaveMessage):
        return op.message.msgid, op.message.topic
    if isinstance(op, RekeyMessage):
        return op.old_id, op.topic
    return op.msgid, op.topic


def _count_done(metrics: Metrics, entries: Sequence[Entry]) -> None:
    deleted = rekeyed = 0
    for entry in entries:
        if isinstance(entry.op, DeleteMessage):
            deleted += 1
        elif isinstance(entry.op, RekeyMessage):
            rekeyed += 1
    if deleted:
        metrics.deleted.inc(deleted)
    if rekeyed:
        metrics.rekeyed.inc(rekeyed)
