"""``MysqlStore``: the ``Store`` interface on MySQL / MariaDB, put together from the
modules of this package (docs/mysql-schema.md describes tables, templates and
guarantees)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence

from storage.base import Store, StoreError
from storage.config import MysqlConfig
from storage.model import PendingReplay, StoredMessage, Subscription, WriteOp
from storage.mysql.bookkeeping import Bookkeeping
from storage.mysql.connection import Connections
from storage.mysql.ddl import DEFAULT_SCHEMA_DDL
from storage.mysql.purge import purge_expired
from storage.mysql.reads import Reads
from storage.mysql.schema import Schema, inspect
from storage.mysql.subscriptions import Subscriptions
from storage.mysql.templates import Templates
from storage.mysql.write import WritePath

log = logging.getLogger(__name__)


class MysqlStore(Store):
    """``Store`` on MySQL / MariaDB driven by the Erlang plugin's SQL templates."""

    name = "mysql"

    def __init__(self, config: MysqlConfig, *, op_timeout_s: float = 30.0) -> None:
        self._cfg = config
        self._ttl = max(0, int(config.message_ttl))
        templates = Templates.compile(config)
        self._db = Connections(config, op_timeout_s)
        self._writes = WritePath(self._db, templates)
        self._reads = Reads(self._db, templates, self._ttl)
        self._subscriptions = Subscriptions(self._db, templates)
        self._bookkeeping = Bookkeeping(self._db)
        self._templates = templates
        self._opened: Schema | None = None

    @property
    def schema(self) -> Schema:
        if self._opened is None:
            raise StoreError("mysql: store is not open")
        return self._opened

    # -- open / close -----------------------------------------------------------
    async def open(self) -> None:
        if self._db.pool is not None:
            return
        await self._db.open()
        try:
            self._opened = await self._prepare()
        except BaseException:
            await self.close()
            raise
        cfg = self._cfg
        log.info("mysql store open: %s database %s, pool %d%s", cfg.server, cfg.database, cfg.pool_size,
                 ", TLS" if self._db.tls else "")

    async def _prepare(self) -> Schema:
        """Create the default schema if asked to, and read the schema. (A connection
        that was to use TLS has it: ``tls_guard``.)"""
        cfg = self._cfg
        async with self._db.connection() as conn, conn.cursor() as cur:
            if cfg.init_default_schema:
                # sql_notes = 0: no "table already exists" warnings
                await cur.execute("SET SESSION sql_notes = 0")
                for ddl in DEFAULT_SCHEMA_DDL:
                    await cur.execute(ddl)
                await cur.execute("SET SESSION sql_notes = 1")
            return await inspect(cur, self._templates, self._ttl)

    async def close(self) -> None:
        self._opened = None
        await self._db.close()

    async def ping(self) -> None:
        await self._db.query("SELECT 1", ())

    # -- writes -----------------------------------------------------------------
    async def write(self, ops: Sequence[WriteOp]) -> None:
        await self._writes.write(ops, self.schema)

    async def save_subscription(self, clientid: str, topic: str, qos: int) -> None:
        await self._subscriptions.save(self.schema, clientid, topic, qos)

    async def delete_subscription(self, clientid: str, topic: str) -> None:
        await self._subscriptions.delete(clientid, topic)

    async def subscriptions(self, clientid: str) -> list[Subscription]:
        return await self._subscriptions.of(clientid)

    # -- replay reads -----------------------------------------------------------
    async def stored_topics(self, pattern_prefix: str) -> list[str]:
        return await self._reads.stored_topics(self.schema, pattern_prefix)

    async def latest_positions(self, topics: Sequence[str]) -> dict[str, float]:
        return await self._reads.latest_positions(topics)

    async def count_messages(self, topics: Sequence[str]) -> dict[str, int]:
        return await self._reads.count_messages(self.schema, topics)

    async def read_messages(
        self, ranges: dict[str, tuple[float | None, float]], page_size: int
    ) -> AsyncIterator[list[StoredMessage]]:
        async for page in self._reads.read_messages(self.schema, ranges, page_size):
            yield page

    # -- replay bookkeeping -------------------------------------------------------
    async def claim_replay(self, connection: str, highs: dict[str, float]) -> dict[str, float | None]:
        return await self._bookkeeping.claim_replay(connection, highs)

    async def reset_replay_marks(self, connection: str) -> None:
        await self._bookkeeping.reset_replay_marks(connection)

    async def register_pending_replays(self, items: Sequence[PendingReplay]) -> None:
        await self._bookkeeping.register_pending_replays(items)

    async def take_pending_replay(self, topic: str, digest: str) -> str | None:
        return await self._bookkeeping.take_pending_replay(topic, digest)

    async def purge_expired(self, limit: int) -> int:
        return await purge_expired(self._db, self.schema.messages, self._ttl, limit)
