"""Bounded sets and maps of keys that each expire a fixed time after they were added.

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


class ExpiringKeys:
    def __init__(self, ttl_s: float, max_keys: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl_s
        self._max = max_keys
        self._clock = clock
        self._added: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._added)

    def add(self, key: str) -> None:
        now = self._clock()
        self._added[key] = now
        self._added.move_to_end(key)
        self._expire(now)

    def pop(self, key: str) -> bool:
        """Remove ``key``; True if it was there and had not expired."""
        added = self._added.pop(key, None)
        now = self._clock()
        self._expire(now)
        return added is not None and now - added < self._ttl

    def _expire(self, now: float) -> None:
        added = self._added
        while added:
            oldest, at = next(iter(added.items()))
            if now - at < self._ttl and len(added) <= self._max:
                return
            del added[oldest]


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
        self._items.pop(key, None)
        self._items[key] = (now, value)
        self._evict(now)

    def pop(self, key: K) -> V | None:
        """The live value for ``key`` (removed), or None."""
        entry = self._items.pop(key, None)
        if entry is None:
            return None
        put_at, value = entry
        return value if self._clock() - put_at < self._ttl else None

    def __len__(self) -> int:
        return len(self._items)

    def _evict(self, now: float) -> None:
        items = self._items
        while items:
            oldest = next(iter(items))
            if len(items) <= self._max and now - items[oldest][0] < self._ttl:
                return
            del items[oldest]
