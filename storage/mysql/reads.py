"""Replay reads, all through the operator's ``select_message_sql``.

Per-topic reads wrap the template in a derived table
(``SELECT ... FROM (<select_message_sql>) AS m WHERE ... ORDER BY m.id``), which
MariaDB/MySQL merge into the outer query, so the topic index is used; up to 100
topics go into one statement (UNION ALL). Wildcard discovery addresses the message
table directly (its name and topic column come from insert_message_sql).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from decimal import Decimal
from typing import Any, TypeVar

from storage.merge import Source, merged_pages
from storage.model import StoredMessage
from storage.mysql.bookkeeping import placeholders
from storage.mysql.columns import text
from storage.mysql.connection import Connections
from storage.mysql.schema import Schema
from storage.mysql.sql_template import quote_ident
from storage.mysql.templates import Templates
from storage.unreadable import SkippedRows, Unreadable

T = TypeVar("T")
_TOPICS_PER_QUERY = 100
# Message ids one replay remembers to give out a message stored twice only once: the
# copies an immediately retried batch stores follow the first ones within about one
# batch (at most 10,000 saves), so the most recent ids are enough (about 1.2 MiB, not
# the whole replay). A copy that landed much later (a batch whose commit was in doubt,
# drained from the spool after other writes) may be replayed twice: a duplicate, never
# a loss.
_DEDUP_WINDOW = 10_000
# The exact topic, byte for byte: the default utf8mb4 collation is case-insensitive
# and pads spaces (`topic = 'a/b'` also matches 'A/B' and 'a/b '). The template's own
# `topic = ${topic}` still selects the index range; this only filters it.
_EXACT_TOPIC = "CAST(CONVERT(m.topic USING utf8mb4) AS BINARY) = %s"


class _Topic(Source[int]):
    """One topic of a merged read: the ids in ``(low, high]`` not buffered yet."""

    __slots__ = ("high", "low")

    def __init__(self, topic: str, low: int | None, high: int) -> None:
        super().__init__(topic)
        self.low = low
        self.high = high


class RecentIds:
    """The last ``size`` message ids a replay gave out, in bounded memory."""

    __slots__ = ("_ids", "_order", "_size")

    def __init__(self, size: int) -> None:
        self._size = max(1, size)
        self._order: deque[str] = deque()
        self._ids: set[str] = set()

    def __len__(self) -> int:
        return len(self._ids)

    def first_time(self, msgid: str) -> bool:
        """False if ``msgid`` is one of the recent ids; else remember it."""
        if msgid in self._ids:
            return False
        self._ids.add(msgid)
        self._order.append(msgid)
        if len(self._order) > self._size:
            self._ids.discard(self._order.popleft())
        return True


SKIPPED = SkippedRows("mysql")


class Reads:
    def __init__(self, connections: Connections, templates: Templates, ttl: int) -> None:
        self._db = connections
        self._t = templates
        self._ttl = ttl

    def _part(self, topic: str, columns: str, where: str, where_args: list[object]) -> tuple[str, list[object]]:
        """``columns`` of the rows of ``topic`` (select_message_sql, exact topic) that
        match ``where``, as one part of a UNION ALL."""
        sel = self._t.select_message
        sql = f"(SELECT {columns} FROM ({sel.sql}) AS m WHERE {_EXACT_TOPIC}{where})"
        return sql, [*sel.args({"topic": topic}), topic.encode("utf-8", "surrogatepass"), *where_args]

    async def _union_all(
        self, items: Sequence[T], part: Callable[[int, T], tuple[str, list[object]]], dict_rows: bool = False
    ) -> AsyncIterator[tuple[Sequence[T], list[Any]]]:
        """One statement per 100 items: the UNION ALL of ``part(i, item)``; yields each
        chunk of items with its rows."""
        for start in range(0, len(items), _TOPICS_PER_QUERY):
            chunk = items[start : start + _TOPICS_PER_QUERY]
            parts: list[str] = []
            args: list[object] = []
            for i, item in enumerate(chunk):
                sql, item_args = part(i, item)
                parts.append(sql)
                args += item_args
            yield chunk, await self._db.query(" UNION ALL ".join(parts), tuple(args), dict_rows=dict_rows)

    def _ttl_args(self, schema: Schema) -> list[object]:
        return [self._ttl] if schema.read_ttl else []

    async def stored_topics(self, schema: Schema, pattern_prefix: str) -> list[str]:
        col = quote_ident(schema.messages.topic)
        # A case-insensitive collation would fold "A/b" and "a/b" into one DISTINCT
        # value: compare bytes then (cost: the matching index entries, not the rows).
        expr = f"CAST(CONVERT({col} USING utf8mb4) AS BINARY)" if schema.messages.topic_ci else col
        sql = f"SELECT DISTINCT {expr} FROM {schema.messages.table}"
        args: tuple[object, ...] = ()
        if pattern_prefix:
            escaped = pattern_prefix.replace("!", "!!").replace("%", "!%").replace("_", "!_")
            sql += f" WHERE {col} LIKE %s ESCAPE '!'"
            args = (escaped + "%",)
        rows = await self._db.query(sql, args)
        return sorted({topic for (value,) in rows if (topic := text(value)).startswith(pattern_prefix)})

    async def _per_topic(self, topics: Sequence[str], select: str, where: str, where_args: list[object]
                        ) -> list[tuple[str, Any]]:
        """One ``select`` per topic over ``select_message_sql`` (the same rows as the
        replay reads, on the topic index); (topic, value) rows."""
        rows: list[tuple[str, Any]] = []
        unique = list(dict.fromkeys(topics))
        async for chunk, found in self._union_all(
            unique, lambda i, topic: self._part(topic, f"{i} AS ox_i, {select}", where, where_args)
        ):
            rows += [(chunk[int(i)], value) for i, value in found]
        return rows

    async def latest_positions(self, topics: Sequence[str]) -> dict[str, float]:
        rows = await self._per_topic(topics, "m.id AS ox_id", " ORDER BY m.id DESC LIMIT 1", [])
        return {topic: float(pos) for topic, pos in rows}

    async def count_messages(self, schema: Schema, topics: Sequence[str]) -> dict[str, int]:
        rows = await self._per_topic(topics, "COUNT(*) AS ox_n", schema.read_ttl, self._ttl_args(schema))
        return {topic: int(n) for topic, n in rows if n}

    async def read_messages(
        self, schema: Schema, ranges: dict[str, tuple[float | None, float]], page_size: int
    ) -> AsyncIterator[list[StoredMessage]]:
        """Two phases: merge ids (cheap, index-only) across topics, then fetch the rows
        of one page by id. Memory stays at one page of payloads plus a few hundred ids
        per topic, whatever the number of topics. One topic: its rows a page at a time."""
        page_size = max(1, int(page_size))
        sources = []
        for topic, (low, high) in ranges.items():
            lo = None if low is None else math.floor(low)
            hi = math.floor(high)
            if lo is None or lo < hi:
                sources.append(_Topic(topic, lo, hi))
        seen = RecentIds(_DEDUP_WINDOW)
        if len(sources) == 1:
            # nothing to merge (a restore's replay of an exact filter): one statement a page
            async for page in self._read_topic(schema, sources[0], page_size, seen):
                yield page
            return
        fetch = min(max(page_size, 100), 1000)

        async def refill(dry: list[_Topic]) -> None:
            await self._refill(schema, dry, fetch)

        async for entries in merged_pages(sources, refill, lambda position: position, page_size):
            page = await self._fetch_rows(schema, [(pos, source.topic) for pos, source in entries], seen)
            if page:
                yield page

    async def _read_topic(self, schema: Schema, source: _Topic, page_size: int, seen: RecentIds
                          ) -> AsyncIterator[list[StoredMessage]]:
        """The rows of one topic's range, a page per statement, in id order."""
        while True:
            sql, args = self._range_part(schema, source, f"m.*, {schema.ts_expr} AS ox_ts", page_size)
            rows: list[dict[str, Any]] = await self._db.query(sql, tuple(args), dict_rows=True)
            if rows:
                source.low = max(int(row["id"]) for row in rows)
                if page := _first_copies(rows, seen):
                    yield page
            if len(rows) < page_size:
                return

    def _range_part(self, schema: Schema, source: _Topic, columns: str, limit: int) -> tuple[str, list[object]]:
        """``columns`` of the first ``limit`` rows of ``source``'s range, in id order."""
        low = "" if source.low is None else " AND m.id > %s"
        return self._part(
            source.topic, columns, f" AND m.id <= %s{low}{schema.read_ttl} ORDER BY m.id LIMIT {int(limit)}",
            [source.high, *([] if source.low is None else [source.low]), *self._ttl_args(schema)],
        )

    async def _refill(self, schema: Schema, sources: list[_Topic], fetch: int) -> None:
        def part(i: int, s: _Topic) -> tuple[str, list[object]]:
            return self._range_part(schema, s, f"{i} AS ox_i, m.id AS ox_id", fetch)

        async for chunk, found in self._union_all(sources, part):
            got: dict[int, list[int]] = {}
            for i, pos in found:
                got.setdefault(int(i), []).append(int(pos))
            for i, s in enumerate(chunk):
                ids = sorted(got.get(i, []))
                s.buffer.extend(ids)
                if ids:
                    s.low = ids[-1]
                s.exhausted = len(ids) < fetch

    async def _fetch_rows(self, schema: Schema, page: list[tuple[int, str]], seen: RecentIds) -> list[StoredMessage]:
        by_topic: dict[str, list[int]] = {}
        for pos, topic in page:
            by_topic.setdefault(topic, []).append(pos)

        def part(_: int, item: tuple[str, list[int]]) -> tuple[str, list[object]]:
            topic, ids = item
            where = f" AND m.id IN ({placeholders(len(ids))}){schema.read_ttl}"
            return self._part(topic, f"m.*, {schema.ts_expr} AS ox_ts", where, [*ids, *self._ttl_args(schema)])

        rows: list[dict[str, Any]] = []
        async for _, found in self._union_all(list(by_topic.items()), part, dict_rows=True):
            rows += found
        return _first_copies(rows, seen)


def _first_copies(rows: list[dict[str, Any]], seen: RecentIds) -> list[StoredMessage]:
    """The rows' messages in position order, each message once: a retried batch can
    (rarely) have stored a message twice (same msgid, two positions); the ack deletes
    both rows (by msgid), and one is replayed."""
    return [m for m in sorted(_messages(rows), key=lambda m: m.position) if seen.first_time(m.msgid)]


def _messages(rows: list[dict[str, Any]]) -> list[StoredMessage]:
    """The rows' messages; an unreadable row is skipped (counted, logged)."""
    return SKIPPED.readable(rows, _to_message, lambda row: (row.get("id"), text(row.get("topic"))))


def _qos(value: Any) -> int:
    """An integer column, or the text of one (a custom schema). One outside 0-2 is a
    message the replay leaves out, counted as ``bad_qos`` (as the other backends'
    readers pass it on): one place for that count."""
    if isinstance(value, (bytes, bytearray, str)):
        value = text(value).strip()
        if value.lstrip("-").isdigit():
            return int(value)
    elif isinstance(value, (int, Decimal)) and value == int(value):
        return int(value)
    raise Unreadable(f"qos {value!r} is not an integer")


def _to_message(row: dict[str, Any]) -> StoredMessage:
    """The message of one row; ``Unreadable`` if it cannot be one."""
    payload = row.get("payload")
    if isinstance(payload, str):  # a text column (a custom schema): the bytes it holds
        data = payload.encode("utf-8", "surrogateescape")
    elif isinstance(payload, (bytes, bytearray, memoryview)):
        data = bytes(payload)
    else:
        raise Unreadable(f"payload is {'NULL' if payload is None else type(payload).__name__}")
    msgid, topic = text(row.get("msgid")), text(row.get("topic"))
    if not msgid or not topic:
        raise Unreadable("no msgid" if not msgid else "no topic")
    retain = row.get("retain")
    return StoredMessage(
        msgid=msgid,
        sender=text(row.get("sender")),
        topic=topic,
        qos=_qos(row.get("qos")),
        retain=bool(int(retain)) if retain is not None else False,
        payload=data,
        timestamp=int(row.get("ox_ts") or 0),
        position=float(row["id"]),
    )
