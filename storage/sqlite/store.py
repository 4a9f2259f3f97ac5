"""``SqliteStore``: the ``Store`` interface over the modules of this package."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from storage.base import Store, StoreError
from storage.config import SqliteConfig
from storage.model import PendingReplay, StoredMessage, Subscription, WriteOp
from storage.sqlite import bookkeeping, reads, write
from storage.sqlite.checks import check_ops, check_subscription, check_texts
from storage.sqlite.connection import Database
from storage.sqlite.purge import purge
from storage.sqlite.schema import Schema

_UPSERT_SUB = (
    "INSERT INTO mqtt_sub(clientid, topic, qos) VALUES (?, ?, ?) "
    "ON CONFLICT(clientid, topic) DO UPDATE SET qos = excluded.qos"
)
_SELECT_SUBS = "SELECT topic, qos FROM mqtt_sub WHERE clientid = ? ORDER BY topic"


class SqliteStore(Store):
    """``Store`` on an embedded SQLite file (see the package docstring)."""

    name = "sqlite"

    def __init__(
        self,
        config: SqliteConfig,
        *,
        readers: int = 2,
        busy_timeout_ms: int = 5000,
        max_value_bytes: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``max_value_bytes`` lowers SQLite's limit on one string or blob (default
        and ceiling: the library's ``SQLITE_LIMIT_LENGTH``, 1e9 bytes)."""
        self._db = Database(
            config.path, readers=readers, busy_timeout_ms=busy_timeout_ms, max_value_bytes=max_value_bytes
        )
        self._ttl_ms = max(0, config.message_ttl) * 1000
        self._clock = clock
        self._schema: Schema | None = None

    @property
    def _writer(self) -> sqlite3.Connection | None:
        """The writer connection, for tests that look at the file through it."""
        return self._db.writer

    # -- lifecycle -------------------------------------------------------------
    async def open(self) -> None:
        if self._db.closed:
            raise StoreError("sqlite store is closed")
        if self._schema is None:
            self._schema = await self._db.open()

    async def close(self) -> None:
        await self._db.close()

    async def ping(self) -> None:
        await self._db.read(lambda conn: conn.execute("SELECT 1").fetchall())

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _cutoff_ms(self, now_ms: int | None = None) -> int | None:
        """Messages that arrived before this are expired (None: no TTL)."""
        if not self._ttl_ms:
            return None
        return (self._now_ms() if now_ms is None else now_ms) - self._ttl_ms

    def _max_length(self) -> int:
        if self._schema is None:
            raise StoreError("sqlite store is not open")
        return self._schema.max_length

    # -- write path ------------------------------------------------------------
    async def write(self, ops: Sequence[WriteOp]) -> None:
        if not ops:
            return
        batch = list(ops)
        max_length = self._max_length()
        await self._db.write_tx(
            lambda conn: write.apply(conn, batch, self._now_ms()),
            check=lambda: check_ops(batch, max_length),
        )

    # -- subscriptions ---------------------------------------------------------
    async def save_subscription(self, clientid: str, topic: str, qos: int) -> None:
        check_subscription(clientid, topic, qos, self._max_length())
        await self._db.write_tx(lambda conn: conn.execute(_UPSERT_SUB, (clientid, topic, qos)))

    async def delete_subscription(self, clientid: str, topic: str) -> None:
        check_texts(self._max_length(), clientid=clientid, topic=topic)
        await self._db.write_tx(
            lambda conn: conn.execute("DELETE FROM mqtt_sub WHERE clientid = ? AND topic = ?", (clientid, topic))
        )

    async def subscriptions(self, clientid: str) -> list[Subscription]:
        rows = await self._db.read(lambda conn: conn.execute(_SELECT_SUBS, (clientid,)).fetchall())
        return [Subscription(topic, qos) for topic, qos in rows]

    async def fresh_session_subscriptions(self, clientid: str, connection: str) -> list[Subscription]:
        def run(conn: sqlite3.Connection) -> list[Any]:
            rows = conn.execute(_SELECT_SUBS, (clientid,)).fetchall()
            bookkeeping.reset_marks(conn, connection)
            return rows

        # one transaction: one hop to the writer thread instead of two
        rows = await self._db.write_tx(run)
        return [Subscription(topic, qos) for topic, qos in rows]

    # -- replay reads ----------------------------------------------------------
    async def stored_topics(self, pattern_prefix: str) -> list[str]:
        return await self._db.read(lambda conn: reads.stored_topics(conn, pattern_prefix))

    async def latest_positions(self, topics: Sequence[str]) -> dict[str, float]:
        highs = await self._per_topic(topics, reads.LATEST)
        return {topic: float(high) for topic, high in highs.items()}

    async def count_messages(self, topics: Sequence[str]) -> dict[str, int]:
        # counted from the topic index (and arrived, under a ttl): no payload is read
        counts = await self._per_topic(topics, reads.COUNT)
        return {topic: int(n) for topic, n in counts.items()}

    async def _per_topic(self, topics: Sequence[str], statements: tuple[str, str]) -> dict[str, Any]:
        wanted = list(dict.fromkeys(topics))
        if not wanted:
            return {}
        return await self._db.read(lambda conn: reads.per_topic(conn, wanted, statements, self._cutoff_ms()))

    def read_messages(
        self, ranges: dict[str, tuple[float | None, float]], page_size: int
    ) -> AsyncIterator[list[StoredMessage]]:
        return reads.read_messages(self._db, dict(ranges), page_size, self._cutoff_ms)

    # -- replay bookkeeping ----------------------------------------------------
    async def claim_replay(self, connection: str, highs: dict[str, float]) -> dict[str, float | None]:
        if not highs:
            return {}
        wanted = dict(highs)
        return await self._db.write_tx(lambda conn: bookkeeping.claim(conn, connection, wanted, self._now_ms()))

    async def reset_replay_marks(self, connection: str) -> None:
        await self._db.write_tx(lambda conn: bookkeeping.reset_marks(conn, connection))

    async def register_pending_replays(self, items: Sequence[PendingReplay]) -> None:
        if not items:
            return
        batch = list(items)
        await self._db.write_tx(lambda conn: bookkeeping.register_pending(conn, batch, self._now_ms()))

    async def take_pending_replay(self, topic: str, digest: str) -> str | None:
        return await self._db.write_tx(lambda conn: bookkeeping.take_pending(conn, topic, digest, self._now_ms()))

    async def purge_expired(self, limit: int) -> int:
        """Delete at most ``limit`` expired messages (by the ``arrived`` index) and
        at most ``limit`` expired rows of each bookkeeping table; return the number
        of messages deleted."""
        if limit <= 0:
            return 0

        def run(conn: sqlite3.Connection) -> int:
            now_ms = self._now_ms()
            return purge(conn, now_ms, self._cutoff_ms(now_ms), limit)

        return await self._db.write_tx(run)
