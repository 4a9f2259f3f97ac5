"""Deleting what has expired, a bounded amount per call (the purge loop calls again)."""

from __future__ import annotations

import sqlite3

# Bookkeeping tables and the key their expired rows are deleted by.
_BOOKKEEPING = (
    ("mqtt_replay_tombstone", "msgid"),
    ("mqtt_replay_mark", "rowid"),
    ("mqtt_replay_pending", "id"),
)


def purge(conn: sqlite3.Connection, now_ms: int, cutoff_ms: int | None, limit: int) -> int:
    """Delete at most ``limit`` messages that arrived before ``cutoff_ms`` (by the
    ``arrived`` index; None: messages never expire) and at most ``limit`` expired rows
    of each bookkeeping table; return the number of messages deleted."""
    purged = 0
    if cutoff_ms is not None:
        purged = conn.execute(
            "DELETE FROM mqtt_msg WHERE id IN "
            "(SELECT id FROM mqtt_msg WHERE arrived < ? ORDER BY arrived LIMIT ?)",
            (cutoff_ms, limit),
        ).rowcount
    for table, key in _BOOKKEEPING:
        # table and key come from the constant above, never from input
        conn.execute(
            f"DELETE FROM {table} WHERE {key} IN "
            f"(SELECT {key} FROM {table} WHERE expires <= ? ORDER BY expires LIMIT ?)",
            (now_ms, limit),
        )
    return max(0, purged)
