"""Moves the spool into the store, oldest first, until it is empty.

It runs while the writer is in spool mode (``exhook.writer``): after an outage, and at
start-up when an earlier run left ops in the spool. A store that fails is tried again
with backoff, for as long as it takes: nothing is ever given up because the store is
down, slow, read-only or misconfigured. Only an op the store refuses for good
(``WriteRejected``) is set aside, and one that keeps breaking the store without a
reason (``SuspectError``) while the op after it goes through: after repeated failures
the drain goes one op at a time and, when the next op alone is written, the one
before it is the culprit.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from exhook.batches import BatchWriter, Entry, SuspectError
from exhook.metrics import Metrics
from exhook.spool import Spool
from storage.base import WriteRejected
from storage.retry import Backoff

# consecutive failures after which the drain goes one op at a time
ONE_BY_ONE_AFTER = 3


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
        async with self._lock:
            if not self._spool.count and self._on_empty():
                return False
            head = await self._spool.head(1 if one_by_one else self._batch_size)
        if not head:
            return True  # emptied, but the writer is still moving ops in
        entries = [Entry(item.op, seq=item.seq) for item in head]
        try:
            await self._write(entries)
        except SuspectError as exc:
            await self._forget_settled(entries)
            if len(entries) == 1 and await self._next_one_goes_through(entries[0]):
                await self._batches.set_aside(entries[0], WriteRejected("refused", str(exc)))
            else:
                raise
        except Exception:
            await self._forget_settled(entries)
            raise
        await self._forget_settled(entries)
        self._metrics.spool_drained.inc(len(entries))
        return True

    async def _write(self, entries: list[Entry]) -> None:
        async with asyncio.timeout(self._stall_after_s):
            await self._batches.write(entries)

    async def _next_one_goes_through(self, suspect: Entry) -> bool:
        """Is the store fine with other data? Write the op after ``suspect`` alone."""
        following = [item for item in await self._spool.head(2) if item.seq != suspect.seq]
        if not following:
            return False
        probe = Entry(following[0].op, seq=following[0].seq)
        try:
            await self._write([probe])
        except Exception:
            return False
        await self._forget_settled([probe])
        return True

    async def _forget_settled(self, entries: list[Entry]) -> None:
        settled = [e.seq for e in entries if e.settled and e.seq is not None]
        if settled:
            async with self._lock:
                await self._spool.remove(settled)
            self._on_change()
