"""The publish deadline of every waiting caller, kept by one timer.

A ``message.publish`` waits for its save until shortly before the broker's deadline;
then its save (and everything queued before it) goes to the spool and the caller is
answered. A timer per publish (``asyncio.timeout``) cost several µs of every call on
the hot path; one timer armed for the earliest deadline of a caller still waiting
serves them all. Entries stay in the heap until the timer passes them (about the
publish rate times the deadline: bounded).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from collections.abc import Awaitable, Callable

from exhook.batches import Entry

log = logging.getLogger("exhook.writer")

# uvloop's clock and timers have millisecond resolution: a timer may fire up to a
# millisecond early, and re-arming for the rest would spin until the tick
_EARLY_S = 0.001


class Deadlines:
    """Calls ``spill(entry)`` for an entry whose caller still waits at its deadline
    (the writer's ``spill``: the entry and every op before it go to the spool)."""

    def __init__(self, spill: Callable[[Entry], Awaitable[None]]) -> None:
        self._spill = spill
        self._heap: list[tuple[float, int, Entry]] = []  # (deadline, submit order, entry)
        self._order = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._armed_at = 0.0
        self._spilling: asyncio.Task[None] | None = None
        self._closed = False

    def add(self, entry: Entry, at: float) -> None:
        """``at``: the event loop's time by which ``entry`` must be settled."""
        heapq.heappush(self._heap, (at, next(self._order), entry))
        if self._spilling is None and (self._timer is None or at < self._armed_at):
            self._arm(at)

    def _arm(self, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._armed_at = at
        self._timer = asyncio.get_running_loop().call_at(at, self._due)

    def _due(self) -> None:
        self._timer = None
        heap = self._heap
        while heap and not heap[0][2].awaited:  # settled, or its caller is gone
            heapq.heappop(heap)
        if not heap:
            return
        at, _, entry = heap[0]
        if at > asyncio.get_running_loop().time() + _EARLY_S:
            self._arm(at)
            return
        self._start_spill(entry)

    def _start_spill(self, entry: Entry) -> None:
        task = asyncio.create_task(self._spill_logged(entry), name="publish-deadline-spill")
        # a done callback: it runs however the task ends (even cancelled before it started)
        task.add_done_callback(lambda _: self._after_spill(entry))
        self._spilling = task

    async def _spill_logged(self, entry: Entry) -> None:
        try:
            await self._spill(entry)
        except Exception:  # a bug: the late caller must still get an answer
            log.exception("spilling writes at a publish deadline failed")

    def _after_spill(self, entry: Entry) -> None:
        self._spilling = None
        # Only a spill that failed leaves its own op unsettled: trying it again at
        # once would spin, so its caller answers "not stored" (the op keeps its
        # place in the writer and may still be stored). Other callers due by now
        # (e.g. submitted while this spill ran) get a spill of their own: they are
        # answered only once their op is durable.
        entry.give_up()
        if not self._closed:
            self._due()

    async def close(self) -> None:
        """Stop the timer; let a spill under way finish (the writer spools the rest)."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._spilling is not None:
            await asyncio.gather(asyncio.shield(self._spilling), return_exceptions=True)
