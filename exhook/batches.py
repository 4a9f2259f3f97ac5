"""Write ops on their way to the store, and writing a batch of them.

Every op ends in exactly one ``Outcome``: STORED (the store has it), SPOOLED (it is in
the local spool on disk, the store gets it later), REJECTED (the store refuses it for
good: set aside, logged, counted; the other ops of its batch are written) or REFUSED
(neither the store nor the spool could take it: not stored, counted). The first
outcome an op gets is final.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from exhook.metrics import Metrics
from exhook.spool import Spool, SpoolError
from storage.base import Store, StoreError, WriteRejected
from storage.model import DeleteMessage, RekeyMessage, SaveMessage, WriteOp

log = logging.getLogger("exhook.writer")


class Outcome(enum.Enum):
    STORED = "stored"
    SPOOLED = "spooled"
    REJECTED = "rejected"
    REFUSED = "refused"


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
    caller_waits: bool = False  # its caller's answer waits for the outcome (a publish)

    @property
    def settled(self) -> bool:
        return self.outcome is not None

    def give_up(self) -> None:
        """The caller stops waiting without an outcome (it answers "not stored"); the
        op keeps its place and may still be stored or spooled."""
        if self.done is not None and not self.done.done():
            self.done.set_result(Outcome.REFUSED)

    @property
    def awaited(self) -> bool:
        """Does a caller still wait for this op's outcome?"""
        return self.outcome is None and self.done is not None and not self.done.done()

    def settle(self, outcome: Outcome) -> None:
        if self.outcome is not None:
            return  # e.g. spooled, then the write in flight landed after all: it stays spooled
        self.outcome = outcome
        if self.done is not None and not self.done.done():
            self.done.set_result(outcome)


class SuspectError(Exception):
    """The store failed on a batch without saying why (a driver's TypeError, an
    OverflowError...): maybe a bug, maybe one op's data. Retried like a transient
    failure; the spool's drainer tells which (``exhook.drainer``)."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")


class BatchWriter:
    """Writes a batch of entries in order; an op the store refuses for good is set
    aside and the others are written (the batch is split until the bad op is found).
    Any other failure propagates, leaving the unwritten entries unsettled."""

    def __init__(self, store: Store, spool: Spool, metrics: Metrics) -> None:
        self.store = store
        self._spool = spool
        self._metrics = metrics

    async def write(self, entries: Sequence[Entry]) -> None:
        pending = [e for e in entries if not e.settled]
        try:
            await self._write_pending(pending)
        except WriteRejected as exc:
            await self._isolate(pending, exc)

    async def _write_pending(self, pending: list[Entry]) -> None:
        """Write the unsettled ``pending`` and settle them; WriteRejected passes through."""
        if not pending:
            return
        started = time.perf_counter()
        try:
            await self.store.write([e.op for e in pending])
        except WriteRejected:
            raise
        except (StoreError, OSError, TimeoutError):
            raise  # the store is down, slow or unusable: not the ops' fault
        except Exception as exc:
            raise SuspectError(exc) from exc
        self._metrics.write_latency.observe(time.perf_counter() - started)
        self._metrics.batch_size.observe(len(pending))
        _count_done(self._metrics, pending)
        for entry in pending:
            entry.settle(Outcome.STORED)

    async def _isolate(self, entries: list[Entry], exc: WriteRejected) -> None:
        # a loop, not a recursion per refused op: a batch of thousands of refused ops
        # (topics too long for the operator's column) must not exhaust the stack
        while exc.index is not None and 0 <= exc.index < len(entries):
            await self.set_aside(entries[exc.index], exc)
            entries = [e for e in entries[: exc.index] + entries[exc.index + 1:] if not e.settled]
            try:
                await self._write_pending(entries)
                return
            except WriteRejected as again:
                exc = again
        if not entries:
            return
        if len(entries) == 1:
            await self.set_aside(entries[0], exc)
        else:
            middle = len(entries) // 2
            await self.write(entries[:middle])
            await self.write(entries[middle:])

    async def set_aside(self, entry: Entry, exc: WriteRejected) -> None:
        if entry.settled:
            return
        op = entry.op
        backend = self.store.name
        self._metrics.write_rejected(backend, exc.reason)
        msgid, topic = identity(op)
        log.error("%s refused a write for good: set aside", backend,
                  extra={"event": "write_rejected", "backend": backend, "op": type(op).__name__, "msgid": msgid,
                         "topic": topic[:200], "reason": exc.reason, "error": exc.detail[:300]})
        try:
            await self._spool.set_aside(backend, exc.reason, exc.detail, op)
        except SpoolError as spool_exc:  # the op is counted and logged above; keeping a copy is a courtesy
            log.error("cannot keep the refused op in the spool's set_aside table: %s", spool_exc)
        entry.settle(Outcome.REJECTED)


def identity(op: WriteOp) -> tuple[str, str]:
    """The message id and topic an op is about (for log lines)."""
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
