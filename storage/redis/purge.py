"""Expiry and the topic index: trimming, clean-up, purge, and the one-off rebuild.

Topic index clean-up. A topic leaves ``{mp}~ox:topics`` only when its zset has no
member left, and only during clean-up (``stored_topics`` finding a topic without
live messages, ``purge_expired``), never on the write path. A publish adds the
index member first, then the topic. Single/sentinel: one script checks ``EXISTS``
and ``ZREM``s atomically. Cluster (keys on different nodes, no script): ``ZREM``
the topic, then ``EXISTS`` its zset again and re-add the topic if a publish came in
between; a concurrent wildcard discovery may miss that topic for that one round
trip, but it is never lost. Topics stored by the Erlang plugin itself are not in
the index: run ``rebuild_topic_index()`` once after a migration (exact-topic
replays read a plugin-written store without it).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

from storage.redis.errors import ERRORS, wrap
from storage.redis.keys import Keys, expiry_deadline, fmt
from storage.redis.link import Link
from storage.redis.rounds import Round, or_empty, value
from storage.redis.scripts import REMOVE_TOPIC_LUA

_PURGE_PAGE = 200  # topics of the index per purge step
_SCAN_BATCH = 500  # topics added to the index per ZADD by the rebuild


class Janitor:
    def __init__(self, link: Link, keys: Keys, ttl: int) -> None:
        self._link, self._keys, self._ttl = link, keys, ttl
        self._purge_from = b"-"  # where the next purge_expired walks the topic index from

    async def cleanup_topics(self, topics: Sequence[bytes]) -> int:
        """Trim expired members of these topics' zsets and drop the topics whose zset
        is gone from the topic index (safe against concurrent publishes, see above).
        Returns the number of members trimmed."""
        keys, deadline = self._keys, expiry_deadline(self._ttl, time.time() * 1000.0)
        rnd = Round("topic clean-up")
        trims = [] if deadline is None else [
            rnd.add(None, "ZREMRANGEBYSCORE", keys.index(t), b"-inf", fmt(deadline)) for t in topics]
        if self._link.cluster:  # no script across nodes: see which zsets are gone, then drop those
            checks = [rnd.add(None, "EXISTS", keys.index(t)) for t in topics]
        else:
            checks = [rnd.add(None, "EVAL", REMOVE_TOPIC_LUA, 2, keys.index(t), keys.topics, t) for t in topics]
        await self._link.send(rnd)
        trimmed = sum(int(or_empty(reply.value, 0, rnd.what)) for reply in trims)
        outcomes = [value(reply, rnd.what) for reply in checks]
        if self._link.cluster:
            await self._drop_empty([t for t, exists in zip(topics, outcomes, strict=True) if not exists])
        return trimmed

    async def _drop_empty(self, empty: list[bytes]) -> None:
        """Cluster: drop topics whose zset was gone, then put back any a publish
        brought back meanwhile."""
        if not empty:
            return
        await self._link.one(("ZREM", self._keys.topics, *empty), "topic clean-up")
        again = await self._link.run([("EXISTS", self._keys.index(t)) for t in empty], "topic clean-up")
        back = [t for t, n in zip(empty, again, strict=True) if n]
        if back:  # a publish came in between: put the topic back
            await self._add(back, "topic clean-up")

    async def purge_expired(self, limit: int) -> int:
        """Trim expired members left in topic zsets (their hashes expired by
        themselves; the plugin only trims a topic when it publishes to it) and drop
        topics without messages from the topic index. Walks the topic index from
        where the previous call stopped; returns the number of members trimmed
        (0 with message_ttl = 0: nothing expires)."""
        removed = 0
        start = self._purge_from
        while True:
            page = await self._link.one(
                ("ZRANGE", self._keys.topics, start, b"+", b"BYLEX", b"LIMIT", 0, _PURGE_PAGE), "purge_expired")
            if page:
                removed += await self.cleanup_topics(page)
                start = b"(" + page[-1]
            if len(page) < _PURGE_PAGE:
                start = b"-"  # end of the index: the next call starts over
                break
            if removed >= limit:
                break
        self._purge_from = start
        return removed

    async def rebuild_topic_index(self) -> int:
        """Add every topic zset under ``{mp}:`` to the topic index (a store written
        by the Erlang plugin has none). Uses SCAN over the whole keyspace: a one-off
        migration step, not for the hot path. Returns the number of topics found."""
        prefix = self._keys.messages
        pattern = prefix.replace(b"\\", b"\\\\").replace(b"*", b"\\*").replace(b"?", b"\\?")
        pattern = pattern.replace(b"[", b"\\[") + b"*"
        found = 0
        try:
            batch: list[bytes] = []
            async for key in self._link.client.scan_iter(match=pattern, count=1000, _type="zset"):
                batch.append(bytes(key)[len(prefix):])
                if len(batch) >= _SCAN_BATCH:
                    found += await self._add(batch, "rebuild_topic_index")
                    batch = []
            if batch:
                found += await self._add(batch, "rebuild_topic_index")
        except ERRORS as exc:
            raise wrap(exc, "rebuild_topic_index") from None
        return found

    async def _add(self, topics: Iterable[bytes], what: str) -> int:
        """ZADD topics to the topic index; returns how many were given."""
        args: list[object] = ["ZADD", self._keys.topics]
        for t in topics:
            args += (0, t)
        if len(args) > 2:
            await self._link.one(tuple(args), what)
        return (len(args) - 2) // 2
