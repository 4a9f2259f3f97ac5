"""The ordered group-commit writer.

Every write of a process (message saves, ack deletes, re-keys) goes through one
FIFO queue drained by one task: each round trip to the store carries whatever is
queued, up to ``batch_size`` ops, in arrival order. So concurrent
``message.publish`` calls share a round trip, and a delete can never overtake the
insert it deletes. A failed batch is retried (ops are idempotent) until the store
comes back; callers stop waiting at their own deadline, the op stays queued.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

from exhook.metrics import Metrics
from storage.base import Store
from storage.errors import one_line
from storage.model import DeleteMessage, RekeyMessage, WriteOp

log = logging.getLogger(__name__)

_BACKOFF_START_S = 0.05
_BACKOFF_MAX_S = 2.0
# A partial batch waits for the next call at most this long (and batch_time in all).
_LINGER_GAP_S = 0.001


class WriterClosed(Exception):
    """The writer is shutting down and takes no more ops."""


class OrderedWriter:
    def __init__(
        self,
        store: Store,
        metrics: Metrics,
        batch_size: int,
        batch_time_ms: int,
        max_pending: int,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._batch_size = batch_size
        self._batch_time = batch_time_ms / 1000
        self._max_pending = max(max_pending, batch_size)
        self._queue: deque[tuple[WriteOp, asyncio.Future[None]]] = deque()
        self._has_work = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._failing_since: float | None = None
        self._failures = 0
        self._in_flight = False
        self._idle = asyncio.Event()

    async def drained(self) -> None:
        """Wait until every op queued so far has been written (tests, benchmarks)."""
        while self._queue or self._in_flight:
            self._idle.clear()
            await self._idle.wait()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="ordered-writer")

    def submit_nowait(self, op: WriteOp) -> asyncio.Future[None] | None:
        """Queue ``op``; return a future resolved once it is durable, or None when
        the buffer is full (the caller waits with ``submit`` or gives up)."""
        if self._closing:
            raise WriterClosed
        if len(self._queue) >= self._max_pending:
            self._space.clear()
            return None
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((op, fut))
        self._has_work.set()
        return fut

    async def submit(self, op: WriteOp) -> asyncio.Future[None]:
        """Queue ``op``, waiting for buffer space (backpressure)."""
        while True:
            fut = self.submit_nowait(op)
            if fut is not None:
                return fut
            await self._space.wait()

    async def _run(self) -> None:
        while True:
            if not self._queue:
                self._idle.set()
                if self._closing:
                    return
                self._has_work.clear()
                await self._has_work.wait()
                continue
            batch = self._take_batch()
            self._in_flight = True  # from here on, also while the batch lingers
            try:
                if len(batch) < self._batch_size and self._batch_time > 0:
                    await self._linger(batch)
                await self._write_until_done(batch)
            finally:
                self._in_flight = False

    def _take_batch(self, room: int | None = None) -> list[tuple[WriteOp, asyncio.Future[None]]]:
        # Group commit: take what is queued now; ops that arrive during the round trip
        # form the next batch.
        take = min(self._batch_size if room is None else room, len(self._queue))
        batch = [self._queue.popleft() for _ in range(take)]
        if len(self._queue) < self._max_pending:
            self._space.set()
        return batch

    async def _linger(self, batch: list[tuple[WriteOp, asyncio.Future[None]]]) -> None:
        """Let a partial batch fill while calls keep arriving: at most ``batch_time``
        in all, and only as long as each next op comes within ``_LINGER_GAP_S``.
        A lone publisher pays at most that gap; a busy service makes few, full
        round trips (each costs far more CPU than waiting for the next call)."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self._batch_time
        while len(batch) < self._batch_size:
            if not self._queue:
                remaining = give_up - loop.time()
                if remaining <= 0:
                    return
                self._has_work.clear()
                try:
                    async with asyncio.timeout(min(_LINGER_GAP_S, remaining)):
                        await self._has_work.wait()
                except TimeoutError:
                    return
            batch += self._take_batch(self._batch_size - len(batch))

    async def _write_until_done(self, batch: list[tuple[WriteOp, asyncio.Future[None]]]) -> None:
        ops = [op for op, _ in batch]
        metrics = self._metrics
        metrics.batch_size.observe(len(ops))
        metrics.pending_writes.set(len(self._queue) + len(ops))
        backoff = _BACKOFF_START_S
        while True:
            started = time.perf_counter()
            try:
                await self._store.write(ops)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the store is down or failing: keep the batch, retry
                self._note_failure(exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX_S)
                continue
            break
        metrics.write_latency.observe(time.perf_counter() - started)
        metrics.pending_writes.set(len(self._queue))
        _count_done(metrics, ops)
        if self._failing_since is not None:
            log.warning("store %s is writable again", self._store.name,
                        extra={"event": "store_recovered", "backend": self._store.name,
                               "failing_for_s": round(time.monotonic() - self._failing_since, 1)})
            self._failing_since = None
        for _, fut in batch:
            if not fut.done():
                fut.set_result(None)

    def _note_failure(self, exc: Exception) -> None:
        self._failures += 1  # counted in the metrics by the store gate (operation "write")
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            log.error("store %s write failed, retrying", self._store.name,
                      extra={"event": "store_write_failed", "backend": self._store.name, "error": one_line(exc)})
        elif self._failures % 50 == 0:
            log.error("store %s still failing", self._store.name,
                      extra={"event": "store_write_failing", "backend": self._store.name,
                             "failures": self._failures, "pending": len(self._queue), "error": one_line(exc)})

    async def close(self, timeout: float) -> None:
        """Stop taking ops and flush what is queued, for at most ``timeout`` s."""
        self._closing = True
        self._has_work.set()
        self._space.set()  # wakes submitters waiting for room: they now get WriterClosed
        if self._task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except TimeoutError:
            log.error("shutdown: %d writes could not be flushed in %.0f s", len(self._queue), timeout)
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


def _count_done(metrics: Metrics, ops: list[WriteOp]) -> None:
    deleted = rekeyed = 0
    for op in ops:
        if isinstance(op, DeleteMessage):
            deleted += 1
        elif isinstance(op, RekeyMessage):
            rekeyed += 1
    if deleted:
        metrics.deleted.inc(deleted)
    if rekeyed:
        metrics.rekeyed.inc(rekeyed)
