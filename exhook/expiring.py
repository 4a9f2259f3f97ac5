"""A bounded map of keys that each expire a fixed time after they were added.

Per-client state kept between two hooks of one connect (a ``session.resumed`` waiting
for its ``client.connected``; the connection whose restore ``session.created``
started) must cost O(1) per call and stay bounded whatever a hostile or broken broker
sends: keys live in insertion order, so the oldest are always at the front and expiry
or overflow only ever pops from there.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class ExpiringMap(Generic[K, V]):
    def __init__(self, ttl_s: float, max_entries: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl_s
        self._max = max_entries
        self._clock = clock
        # insertion order = age order (a re-put moves the key to the end), so the
        # oldest entry is always first and eviction never scans
        self._items: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def put(self, key: K, value: V) -> None:
        now = self._clock()
        items = self._items
        items[key] = (now, value)
        items.move_to_end(key)  # a re-put is the youngest again
        self._evict(now)

    def pop(self, key: K) -> V | None:
        """The live value for ``key`` (removed), or None."""
        entry = self._items.pop(key, None)
        if entry is None:
            return None
        put_at, value = entry
        return value if self._clock() - put_at < self._ttl else None

    def get(self, key: K) -> V | None:
        """The live value for ``key`` (kept), or None."""
        entry = self._items.get(key)
        if entry is None or self._clock() - entry[0] >= self._ttl:
            return None
        return entry[1]

    def __len__(self) -> int:
        return len(self._items)

    def _evict(self, now: float) -> None:
        items = self._items
        while items:
            oldest = next(iter(items))
            if len(items) <= self._max and now - items[oldest][0] < self._ttl:
                return
            del items[oldest]

