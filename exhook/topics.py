"""MQTT topic filters: validation, shared-subscription prefixes, matching."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from functools import lru_cache

SHARE_PREFIX = "$share/"
QUEUE_PREFIX = "$queue/"
MAX_TOPIC_BYTES = 65535


class TopicError(ValueError):
    """A topic or filter that MQTT does not allow."""


def validate_filter(flt: str) -> str:
    """Return ``flt`` if it is a valid (non-shared) MQTT topic filter."""
    if not flt:
        raise TopicError("empty topic filter")
    if "\x00" in flt:
        raise TopicError(f"topic filter {flt!r} contains a NUL character")
    if len(flt.encode()) > MAX_TOPIC_BYTES:
        raise TopicError("topic filter longer than 65535 bytes")
    levels = flt.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise TopicError(f"topic filter {flt!r}: '#' must be a whole, last level")
        if "+" in level and level != "+":
            raise TopicError(f"topic filter {flt!r}: '+' must be a whole level")
    return flt


def real_filter(flt: str) -> str:
    """Strip a shared-subscription prefix: ``$share/g/a/b`` -> ``a/b``,
    ``$queue/a/b`` -> ``a/b``; other filters are returned as they are."""
    if flt.startswith(SHARE_PREFIX):
        parts = flt.split("/", 2)
        if len(parts) < 3 or not parts[1] or not parts[2]:
            raise TopicError(f"malformed shared subscription {flt!r}")
        return parts[2]
    if flt.startswith(QUEUE_PREFIX):
        return flt[len(QUEUE_PREFIX) :]
    return flt


def filter_key(flt: str) -> bytes:
    """16 bytes that stand for ``flt`` in per-connection bookkeeping: a filter may be
    64 KiB long, and such sets are kept for every recent connection."""
    return hashlib.blake2b(flt.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def is_wildcard(flt: str) -> bool:
    return "+" in flt or "#" in flt


def literal_prefix(flt: str) -> str:
    """What every topic matching ``flt`` starts with: the part before its first
    wildcard (all of it if none), without the ``/`` before a ``#``, which also
    matches the parent level (``a/#`` matches ``a``)."""
    cut = len(flt)
    for ch in "+#":
        i = flt.find(ch)
        if i != -1:
            cut = min(cut, i)
    if flt[cut:] == "#" and cut > 0:
        cut -= 1
    return flt[:cut]


@lru_cache(maxsize=4096)
def _levels(flt: str) -> tuple[str, ...]:
    return tuple(flt.split("/"))


def matches(flt: str, topic: str) -> bool:
    """True if ``topic`` (a concrete topic name) matches filter ``flt``.

    As in MQTT, wildcards at the first level do not match topics starting with
    ``$`` (so ``#`` never matches ``$SYS/...``).
    """
    if flt == topic:
        return True
    if not is_wildcard(flt):
        return False
    if topic.startswith("$") and flt[0] in "+#":
        return False
    pattern = _levels(flt)
    names = topic.split("/")
    for i, level in enumerate(pattern):
        if level == "#":
            return True
        if i >= len(names):
            return False
        if level != "+" and level != names[i]:
            return False
    return len(pattern) == len(names)


class TopicSet:
    """A fixed set of filters with a per-topic answer cache (the publish hot path
    asks the same few topics again and again)."""

    __slots__ = ("filters", "_cache", "_cache_limit")

    def __init__(self, filters: Iterable[str], cache_limit: int = 65536) -> None:
        self.filters: tuple[str, ...] = tuple(filters)
        self._cache: dict[str, bool] = {}
        self._cache_limit = cache_limit

    def __bool__(self) -> bool:
        return bool(self.filters)

    def match(self, topic: str) -> bool:
        hit = self._cache.get(topic)
        if hit is None:
            hit = any(matches(f, topic) for f in self.filters)
            if len(self._cache) >= self._cache_limit:
                self._cache.clear()
            self._cache[topic] = hit
        return hit

    def overlaps(self, flt: str) -> bool:
        """True if a subscription filter ``flt`` could match a tracked topic."""
        return any(_filters_overlap(flt, f) for f in self.filters)


def _filters_overlap(a: str, b: str) -> bool:
    la, lb = _levels(a), _levels(b)
    for i in range(max(len(la), len(lb))):
        x = la[i] if i < len(la) else None
        y = lb[i] if i < len(lb) else None
        if x == "#" or y == "#":
            return True
        if x is None or y is None:
            return False
        if x != y and x != "+" and y != "+":
            return False
    return True
