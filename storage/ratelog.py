"""The one way to keep a recurring event to one log line a minute.

A flood of the same event (rejected requests, messages not stored, a failing store)
must stay readable and cheap: the first occurrence of each kind is logged at once,
then at most one line per ``every_s`` for that kind, saying how many occurrences it
stands for.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable

EVERY_S = 60.0


class RateLimitedLog:
    def __init__(self, every_s: float = EVERY_S, clock: Callable[[], float] = time.monotonic) -> None:
        self._every = every_s
        self._clock = clock
        self._last: dict[Hashable, tuple[float, int]] = {}  # kind -> (last line, events since)

    def note(self, kind: Hashable = None) -> int:
        """Count one event of ``kind``; how many events a line written now stands
        for, or 0 when it must stay quiet. (The kinds must be a small, fixed set.)"""
        now = self._clock()
        last, since = self._last.get(kind, (now - self._every, 0))
        since += 1
        if now - last < self._every:
            self._last[kind] = (last, since)
            return 0
        self._last[kind] = (now, 0)
        return since
