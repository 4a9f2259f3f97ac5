"""``message_ttl``: delete expired messages (and expired replay bookkeeping) in
bounded steps."""

from __future__ import annotations

from typing import Any

from storage.mysql.bookkeeping import placeholders
from storage.mysql.connection import Connections
from storage.mysql.ddl import STATE_TABLES
from storage.mysql.schema import MessageColumns
from storage.mysql.sql_template import quote_ident


async def purge_expired(db: Connections, messages: MessageColumns, ttl: int, limit: int) -> int:
    """Delete at most ``limit`` expired messages and as many expired rows of each
    bookkeeping table; return how many messages went."""
    limit = max(1, int(limit))

    async def once() -> int:
        async with db.connection() as conn, conn.cursor() as cur:
            deleted = await _purge_messages(cur, messages, ttl, limit)
            for table in STATE_TABLES:
                await cur.execute(f"DELETE FROM {table} WHERE expires < UNIX_TIMESTAMP() LIMIT %s", (limit,))
            return deleted

    return await db.retrying(once, lambda: True)


async def _purge_messages(cur: Any, messages: MessageColumns, ttl: int, limit: int) -> int:
    if ttl <= 0 or not messages.id or not messages.time:
        return 0
    id_col, time_col = quote_ident(messages.id), quote_ident(messages.time)
    if messages.time_kind == "temporal":
        expired = "{} < NOW() - INTERVAL %s SECOND"
    else:
        expired = "{} < (UNIX_TIMESTAMP() - %s) * 1000"
    # Look at the `limit` oldest rows only (primary key order = arrival order), without
    # locks; delete the expired ones among them by id. Cost is bounded by `limit`
    # whatever the table size.
    await cur.execute(
        f"SELECT o.id FROM (SELECT {id_col} AS id, {time_col} AS t FROM {messages.table} "
        f"ORDER BY {id_col} LIMIT %s) AS o WHERE {expired.format('o.t')}",
        (limit, ttl),
    )
    ids = [r[0] for r in await cur.fetchall()]
    if not ids:
        return 0
    await cur.execute(
        f"DELETE FROM {messages.table} WHERE {id_col} IN ({placeholders(len(ids))}) AND {expired.format(time_col)}",
        (*ids, ttl),
    )
    return int(cur.rowcount)
