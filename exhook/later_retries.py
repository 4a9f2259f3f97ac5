"""Client jobs tried again later, after a failure outlasted their own retries.

A restore or a replay retries a store or EMQX API failure a few times within seconds
(``exhook.retry.BACKGROUND``). An outage longer than that (EMQX's REST API restarting,
a database failing over) would otherwise leave a client that stays connected without
its subscriptions or its stored messages until it happens to connect again, which may
be days. So the failed part is tried again, as a new job of that client, after a pause
that grows with each failure (``LATER``: 10-20 s, then up to a minute) for as long as it
fails with an error another try may not see, at most ``MAX_FAILURES`` times (about an
hour). The job itself decides whether it still applies (the client may have connected
again, or left: its next connect restores it).

One entry per key (a connection's restore, or one filter's replay on a connection): a
failure of what is already waiting changes nothing. At most ``max_waiting`` entries;
beyond, the oldest is dropped (counted: its client gets it at its next connect).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from collections.abc import Callable, Hashable

from storage.ratelog import RateLimitedLog
from storage.retry import Backoff

log = logging.getLogger(__name__)

LATER = Backoff(base=20.0, cap=60.0)
MAX_WAITING = 100_000
# about an hour of tries: a client that left meanwhile looks the same as one still
# connected until the broker answers, so the tries must end (its next connect restores it)
MAX_FAILURES = 60


class LaterRetries:
    """Owned by the hook logic; ``run`` is one of the service's supervised loops."""

    def __init__(self, backoff: Backoff | None = None, max_waiting: int = MAX_WAITING,
                 on_dropped: Callable[[], None] = lambda: None,
                 on_change: Callable[[int], None] = lambda waiting: None) -> None:
        self._backoff = backoff or LATER
        self._max = max_waiting
        self._on_dropped = on_dropped
        self._on_change = on_change
        self._entries: dict[Hashable, tuple[float, Callable[[], None]]] = {}  # key -> (due, what to run)
        self._heap: list[tuple[float, int, Hashable]] = []  # (due, seq, key); stale rows skipped
        self._seq = 0
        self._changed = asyncio.Event()
        self._logs = RateLimitedLog()

    @property
    def waiting(self) -> int:
        return len(self._entries)

    def schedule(self, key: Hashable, failures: int, what: str, run: Callable[[], None]) -> None:
        """Call ``run`` after the pause for ``failures`` consecutive failures, unless
        ``key`` is already waiting."""
        if key in self._entries:
            return
        if failures > MAX_FAILURES:
            self._on_dropped()
            log.warning("%s failed %d times: not tried again (the client's next connect replays it)", what,
                        failures, extra={"event": "retry_given_up", "what": what, "failures": failures})
            return
        if len(self._entries) >= self._max:
            oldest = next(iter(self._entries))
            del self._entries[oldest]
            self._on_dropped()
        pause = self._backoff.delay(failures)
        due = asyncio.get_running_loop().time() + pause
        self._entries[key] = (due, run)
        self._seq += 1
        heapq.heappush(self._heap, (due, self._seq, key))
        if since := self._logs.note(what):
            log.warning("%s failed: tried again in %.0f s", what, pause, extra={
                "event": "retry_later", "what": what, "failures": failures, "since_last_line": since})
        self._on_change(len(self._entries))
        self._changed.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._changed.clear()
            now = loop.time()
            while self._heap and self._heap[0][0] <= now:
                due, _, key = heapq.heappop(self._heap)
                entry = self._entries.get(key)
                if entry is not None and entry[0] == due:
                    del self._entries[key]
                    self._on_change(len(self._entries))
                    entry[1]()
            if not self._entries:
                self._heap.clear()  # only stale rows left
            timeout = self._heap[0][0] - now if self._heap else None
            try:
                async with asyncio.timeout(timeout):
                    await self._changed.wait()
            except TimeoutError:
                pass
