"""Moves the spool into the store, oldest first, until it is empty.

It runs while the writer is in spool mode (``exhook.writer``): after an outage, and at
start-up when an earlier run left ops in the spool. A store that fails is tried again
with backoff, for as long as it takes: nothing is ever given up because the store is
down, slow, read-only or misconfigured. Only an op the store refuses for good
(``WriteRejected``) is set aside, and one that keeps breaking the store without a
reason (``SuspectError``) while other data goes through: after repeated failures the
drain goes one op at a time; when the head breaks the store alone, the ops after it
are tried alone, in order (the head again before each), until one is written (the
store works). Each op of the run
before that one is then tried once more and set aside only if it breaks the store
again (a run: a poison message and its own ack, or the same message twice). A store
error or a stall ends the search with nothing set aside (the store is down, not the
data), and so does a run longer than ``SUSPECT_RUN_MAX`` (a store that breaks on
everything). A spool row that cannot be read is moved aside by the spool itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from exhook.batches import BatchWriter, Entry, Outcome, SuspectError
from exhook.metrics import Metrics
from exhook.spool import Spool
from storage.base import WriteRejected
from storage.retry import Backoff

log = logging.getLogger(__name__)

# consecutive failures after which the drain goes one op at a time
ONE_BY_ONE_AFTER = 3
# the most ops after a suspect head one search tries alone: a longer run of ops that
# each break the store is taken for a broken store (retried with backoff, not set aside)
SUSPECT_RUN_MAX = 100
# A drain step reads at most about this much of the spool (and at least one op): the
# spool's one thread is busy meanwhile, and a spill (a publish at its deadline) waits
# for it; the drainer holds the ops it read in memory until the store has them.
DRAIN_STEP_BYTES = 4 << 20
# the pause before looking again at a spool found empty while the writer still holds ops
EMPTY_PAUSE_S = 0.05


class SpoolDrainer:
    def __init__(self, spool: Spool, batches: BatchWriter, lock: asyncio.Lock, metrics: Metrics, *,
                 batch_size: int, backoff: Backoff, stall_after_s: float,
                 on_empty: Callable[[], bool], on_failure: Callable[[Exception], None],
                 on_success: Callable[[], None], on_change: Callable[[], None]) -> None:
        self._spool = spool
        self._batches = batches
        self._lock = lock
        self._metrics = metrics
        self._batch_size = batch_size
        self._backoff = backoff
        self._stall_after_s = stall_after_s
        self._on_empty = on_empty  # under the lock, the spool empty: may the writer go direct? (True: done)
        self._on_failure = on_failure
        self._on_success = on_success
        self._on_change = on_change  # the spool shrank (gauges)
        self._damaged_seen = spool.damaged

    async def run(self, direct_idle: Awaitable[object]) -> None:
        await direct_idle  # the batch in flight when spooling began lands first
        failures = 0
        while True:
            try:
                if not await self._step(one_by_one=failures >= ONE_BY_ONE_AFTER):
                    return
            except Exception as exc:  # the store, or the spool itself: keep trying, say why
                self._on_failure(exc)
                failures += 1
                await asyncio.sleep(self._backoff.delay(failures))
                continue
            failures = 0
            self._on_success()

    async def _step(self, one_by_one: bool) -> bool:
        """Write the spool's oldest ops to the store; False once it is empty."""
        # The lock covers only the decision to go direct (a fresh count: ops are appended
        # and removed under it), not the read: a spill must not wait for a drain step's
        # read. Reading without it is safe: the writer only appends (after every row read
        # here) and only this drainer removes rows (_forget_settled, or head itself for a
        # damaged row), so the rows read stay the spool's oldest until written.
        async with self._lock:
            if not self._spool.count and self._on_empty():
                return False
        head = await self._spool.head(1 if one_by_one else self._batch_size, max_bytes=DRAIN_STEP_BYTES)
        self._count_damaged()
        if not head:
            await self._recount()
            # emptied, but the writer is still moving ops in (or its loop is down, waiting
            # for its restart): look again in a moment, not in a hot loop
            await asyncio.sleep(EMPTY_PAUSE_S)
            return True
        entries = [Entry(item.op, seq=item.seq) for item in head]
        try:
            await self._write(entries)
        except SuspectError as exc:
            await self._forget_settled(entries)
            if len(entries) > 1:
                raise  # the next tries go one by one (ONE_BY_ONE_AFTER)
            await self._resolve_suspects(entries[0], exc)
            return True
        except Exception:
            await self._forget_settled(entries)
            raise
        await self._written(entries)
        return True

    async def _recount(self) -> None:
        """The spool had no row to read although its count said otherwise when this
        step began: the rows the writer was moving in, or a count that drifted (rows
        deleted by hand). Counted again under the lock, so the next step ends the drain
        if it is really empty, instead of reading an empty spool forever."""
        async with self._lock:
            if not self._spool.count:
                return
            off = await self._spool.recount()
        if off:
            log.warning("spool %s: %d ops counted that are not in the file (removed by hand?): count corrected",
                        self._spool.path, off, extra={"event": "spool_recounted", "off_by": off})
            self._on_change()

    async def _write(self, entries: list[Entry]) -> None:
        async with asyncio.timeout(self._stall_after_s):
            await self._batches.write(entries)

    async def _resolve_suspects(self, head: Entry, exc: SuspectError) -> None:
        """``head`` broke the store alone: find the first op after it the store takes,
        then judge the ops before that one. Raises ``exc`` if there is none, any other
        error as it comes (nothing set aside)."""
        taken = await self._first_taken_after(head)
        if head.settled:  # it went through when tried again: the store is back, drain on in order
            await self._written([head])
            return
        if taken is None:
            raise exc
        await self._retry_or_set_aside_before(taken)

    async def _first_taken_after(self, head: Entry) -> int | None:
        """Write the ops after ``head`` alone, in order, until one goes through: its row
        (then out of the spool). None: each of the next SUSPECT_RUN_MAX broke the store
        too, the spool ended, or ``head`` itself went through. A store error or stall
        propagates: the store is down, which says nothing about the data."""
        assert head.seq is not None
        seq = head.seq
        for _ in range(SUSPECT_RUN_MAX):
            following = await self._spool.head(1, after=seq)  # one at a time: a run may be large messages
            if not following:
                return None
            # the head once more, right before each probe: a store that broke on everything
            # and is back takes the head here, in order, rather than the probe ahead of it
            if await self._goes_through(head):
                return None
            probe = Entry(following[0].op, seq=following[0].seq)
            if await self._goes_through(probe):
                if probe.outcome is Outcome.STORED:
                    await self._written([probe])
                    return following[0].seq
                # refused for good (set aside, out of the spool): the store looked at it
                # without writing, which says nothing of whether it works
                await self._forget_settled([probe])
            seq = following[0].seq
        return None

    async def _retry_or_set_aside_before(self, taken: int) -> None:
        """The store took row ``taken``: try each op before it (the run of suspects, at
        the head) alone once more; one that breaks the store again is the culprit, set
        aside. One that goes through now met a store that came back between its try
        and the probe's: stored late (not lost). A store error leaves the rest for the
        next step."""
        while head := await self._spool.head(1):
            if head[0].seq >= taken:
                return
            suspect = Entry(head[0].op, seq=head[0].seq)
            try:
                await self._write([suspect])
                self._metrics.spool_drained.inc()
            except SuspectError as again:
                await self._batches.set_aside(suspect, WriteRejected("refused", str(again)))
            await self._forget_settled([suspect])

    async def _goes_through(self, entry: Entry) -> bool:
        """Write ``entry`` alone; False if it breaks the store (any other error propagates)."""
        try:
            await self._write([entry])
        except SuspectError:
            return False
        return True

    def _count_damaged(self) -> None:
        """Rows the spool moved aside because they could not be read (one log line each
        there; those met while searching are counted at the next step): counted like
        ops the store refused, under backend "spool"."""
        for _ in range(self._spool.damaged - self._damaged_seen):
            self._metrics.write_rejected("spool", "damaged")
        self._damaged_seen = self._spool.damaged

    async def _written(self, entries: list[Entry]) -> None:
        """``entries`` are in the store: out of the spool, and counted as drained."""
        await self._forget_settled(entries)
        self._metrics.spool_drained.inc(len(entries))

    async def _forget_settled(self, entries: list[Entry]) -> None:
        settled = [e.seq for e in entries if e.settled and e.seq is not None]
        if settled:
            async with self._lock:
                await self._spool.remove(settled)
            self._on_change()
