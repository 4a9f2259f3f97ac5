"""Replay reads: wildcard discovery, newest positions, counts and paged, merged reads.

``read_messages`` keeps one cursor per topic (``ZRANGE key (low high BYSCORE LIMIT
0 n WITHSCORES``, n = page_size shared over the topics, at least 4), merges the
cursors' heads by (score, GUID) with ``storage.merge.merged_pages`` and loads each
page's hashes with one pipelined HGETALL round trip: memory stays at about two
pages however many messages match. A page that ends inside a run of equal scores is
re-read from that score, so ties come out complete and in GUID order. Expired
members (score <= now - ttl) are not read; members whose hash is gone are skipped
and ZREMed.

A topic whose key holds another type (a topic spelled like a stored message's b62
id names that message's hash) has no messages: its WRONGTYPE reply reads as empty
instead of failing every replay whose filter covers it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from storage.base import StoreConfigError
from storage.base62 import Base62Error, b62_to_msgid
from storage.merge import Source, merged_pages
from storage.model import StoredMessage
from storage.redis.keys import (
    F_FROM,
    F_PAYLOAD,
    F_QOS,
    F_RETAIN,
    F_TS,
    TRUE,
    Cmd,
    Keys,
    expiry_deadline,
    fmt,
    live_min,
)
from storage.redis.link import Link
from storage.redis.purge import Janitor
from storage.redis.rounds import or_empty
from storage.unreadable import SkippedRows

SKIPPED = SkippedRows("redis")

_TOPIC_PAGE = 1000  # topics per ZRANGE BYLEX page
_MIN_FETCH = 4  # members fetched per topic cursor at least
_COUNT_PAGE = 10000  # members per ZRANGE when counting without ZCOUNT

# Tie-break of equal scores: the b62 id with its symbols mapped to their 6-bit
# values' order sorts like the GUID (GUIDs of one score share their first 64 bits,
# so their decimal texts have the same length).
_B62_ORDER = bytes.maketrans(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789",
    bytes(range(0x40, 0x40 + 62)),
)

Entry = tuple[float, bytes, bytes]  # (score, tie-break, member)


class Cursor(Source[Entry]):
    """One topic's paged read: members with ``low < score <= high``."""

    __slots__ = ("high", "key", "low")

    def __init__(self, topic: str, key: bytes, low: bytes, high: bytes) -> None:
        super().__init__(topic)
        self.key = key
        self.low = low  # ZRANGE BYSCORE min: b"-inf", b"(x" or b"x" (re-read ties at x)
        self.high = high


def pairs(reply: Sequence[Any]) -> list[tuple[bytes, float]]:
    """A ``ZRANGE ... WITHSCORES`` reply: redis-py 8 pairs it up ([member, score]),
    older versions and RESP2 without the callback give a flat list."""
    if reply and isinstance(reply[0], (list, tuple)):
        return [(m, float(s)) for m, s in reply]
    return [(reply[i], float(reply[i + 1])) for i in range(0, len(reply) - 1, 2)]


def _buffer(c: Cursor, rows: list[tuple[bytes, float]]) -> None:
    order = _B62_ORDER
    items = [(score, member.translate(order), member) for member, score in rows]
    for i in range(1, len(items)):
        if items[i][0] == items[i - 1][0]:  # equal scores: GUID order
            items.sort()
            break
    c.buffer.extend(items)


class Reader:
    def __init__(self, link: Link, keys: Keys, ttl: int, janitor: Janitor) -> None:
        self._link, self._keys, self._ttl, self._janitor = link, keys, ttl, janitor

    def _live_min(self) -> bytes:
        return live_min(expiry_deadline(self._ttl, time.time() * 1000.0))

    async def _per_topic(self, cmds: list[Cmd], what: str, empty: Any) -> list[Any]:
        """One reply per topic's zset; ``empty`` for a key that holds another type."""
        return [or_empty(value, empty, what) for value in await self._link.run(cmds, what, refusals=True)]

    async def _topic_range(self, lo: bytes, hi: bytes) -> list[bytes]:
        out: list[bytes] = []
        while True:
            page = await self._link.one(
                ("ZRANGE", self._keys.topics, lo, hi, b"BYLEX", b"LIMIT", 0, _TOPIC_PAGE), "stored_topics")
            out += page
            if len(page) < _TOPIC_PAGE:
                return out
            lo = b"(" + page[-1]

    async def stored_topics(self, pattern_prefix: str) -> list[str]:
        prefix = pattern_prefix.encode()
        lo, hi = (b"[" + prefix, b"[" + prefix + b"\xff") if prefix else (b"-", b"+")
        candidates = await self._topic_range(lo, hi)
        if not candidates:
            return []
        floor = self._live_min()
        newest = await self._per_topic(
            [("ZRANGE", self._keys.index(t), b"+inf", floor, b"BYSCORE", b"REV", b"LIMIT", 0, 1)
             for t in candidates], "stored_topics", [])
        live = [t for t, n in zip(candidates, newest, strict=True) if n]
        stale = [t for t, n in zip(candidates, newest, strict=True) if not n]
        if stale:
            await self._janitor.cleanup_topics(stale)
        return [t.decode("utf-8", "replace") for t in live]

    async def latest_positions(self, topics: Sequence[str]) -> dict[str, float]:
        if not topics:
            return {}
        floor = self._live_min()
        res = await self._per_topic(
            [("ZRANGE", self._keys.index(t), b"+inf", floor, b"BYSCORE", b"REV", b"LIMIT", 0, 1, b"WITHSCORES")
             for t in topics], "latest_positions", [])
        out: dict[str, float] = {}
        for t, r in zip(topics, res, strict=True):
            rows = pairs(r)
            if rows:
                out[t] = rows[0][1]
        return out

    async def count_messages(self, topics: Sequence[str]) -> dict[str, int]:
        unique = list(dict.fromkeys(topics))
        if not unique:
            return {}
        floor = self._live_min()
        try:
            res = await self._per_topic([("ZCOUNT", self._keys.index(t), floor, b"+inf") for t in unique],
                                        "count_messages", 0)
            counts = [int(n) for n in res]
        except StoreConfigError:  # ZCOUNT not granted (docs/redis-acl.md lists the service's commands only)
            counts = [await self.count_by_range(self._keys.index(t), floor) for t in unique]
        return {t: n for t, n in zip(unique, counts, strict=True) if n}

    async def count_by_range(self, key: bytes, floor: bytes) -> int:
        total = 0
        while True:
            page = await self._per_topic(
                [("ZRANGE", key, floor, b"+inf", b"BYSCORE", b"LIMIT", total, _COUNT_PAGE)], "count_messages", [])
            total += len(page[0])
            if len(page[0]) < _COUNT_PAGE:
                return total

    def read_messages(
        self, ranges: dict[str, tuple[float | None, float]], page_size: int
    ) -> AsyncIterator[list[StoredMessage]]:
        return self._read_messages(dict(ranges), max(1, page_size))

    async def _read_messages(
        self, ranges: dict[str, tuple[float | None, float]], page_size: int
    ) -> AsyncIterator[list[StoredMessage]]:
        deadline = expiry_deadline(self._ttl, time.time() * 1000.0)
        cursors: list[Cursor] = []
        for topic, (low, high) in ranges.items():
            if deadline is not None and (low is None or low < deadline):
                low = deadline
            if low is not None and low >= high:
                continue
            lo = b"-inf" if low is None else b"(" + fmt(low)
            cursors.append(Cursor(topic, self._keys.index(topic), lo, fmt(high)))
        if not cursors:
            return
        fetch = max(_MIN_FETCH, min(page_size, (2 * page_size) // len(cursors)))

        async def refill(dry: list[Cursor]) -> None:
            await self._fill(dry, fetch)

        async for merged in merged_pages(cursors, refill, lambda e: (e[0], e[1]), page_size):
            page = await self._load(merged)
            if page:
                yield page

    async def _fill(self, cursors: Sequence[Cursor], fetch: int) -> None:
        """Refill the buffers of these cursors (one round trip, plus one per topic
        whose whole page shares one score)."""
        res = await self._per_topic(
            [("ZRANGE", c.key, c.low, c.high, b"BYSCORE", b"LIMIT", 0, fetch, b"WITHSCORES") for c in cursors],
            "read_messages", [])
        ties: list[tuple[Cursor, float]] = []
        for c, flat in zip(cursors, res, strict=True):
            rows = pairs(flat)
            if len(rows) < fetch:
                c.exhausted = True
            elif rows[0][1] == rows[-1][1]:  # a full page of one score: read that score whole
                ties.append((c, rows[0][1]))
                continue
            else:  # the last score may continue on the next page: read it again from there
                last = rows[-1][1]
                while rows and rows[-1][1] == last:
                    rows.pop()
                c.low = fmt(last)
            _buffer(c, rows)
        if ties:
            res = await self._link.run(
                [("ZRANGE", c.key, fmt(s), fmt(s), b"BYSCORE", b"WITHSCORES") for c, s in ties], "read_messages")
            for (c, s), flat in zip(ties, res, strict=True):
                c.low = b"(" + fmt(s)
                _buffer(c, pairs(flat))

    async def _load(self, merged: Sequence[tuple[Entry, Cursor]]) -> list[StoredMessage]:
        keys = self._keys
        # a member whose key became another topic's zset (a topic spelled like its b62
        # id, after its hash went) answers WRONGTYPE: it is dangling like one whose hash
        # is gone, not a reason to fail the page and with it every replay of the topic
        hashes = [or_empty(h, {}, "read_messages") for h in await self._link.run(
            [("HGETALL", keys.message(member)) for (_, _, member), _ in merged], "read_messages", refusals=True)]
        page: list[StoredMessage] = []
        dangling: list[Cmd] = []
        for ((score, _, member), c), h in zip(merged, hashes, strict=True):
            if not h:
                dangling.append(("ZREM", c.key, member))
                continue
            try:
                page.append(StoredMessage(
                    msgid=b62_to_msgid(member),
                    sender=h.get(F_FROM, b"").decode("utf-8", "replace"),
                    topic=c.topic,
                    qos=int(h.get(F_QOS) or 1),
                    retain=h.get(F_RETAIN) == TRUE,
                    payload=h.get(F_PAYLOAD, b""),
                    timestamp=int(h.get(F_TS) or 0),
                    position=score,
                ))
            except (Base62Error, ValueError) as exc:
                SKIPPED.skip(member, c.topic, exc)
        if dangling:
            await self._link.run(dangling, "read_messages (dangling index members)")
        return page
