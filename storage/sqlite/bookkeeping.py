"""Replay bookkeeping shared by every service instance on the file: per-connection
replay marks (``claim_replay``), tombstones of replay acks, and the v2 pending-replay
registry. Each function runs on the writer thread inside one transaction."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from storage.base import PENDING_REPLAY_TTL_S, REPLAY_MARK_TTL_S
from storage.model import PendingReplay

# Written by the write path (storage.sqlite.write): an ack of a replay leaves a
# tombstone before deleting; a re-key deletes its new copy when one exists.
UPSERT_TOMBSTONE = (
    "INSERT INTO mqtt_replay_tombstone(msgid, expires) VALUES (?, ?) "
    "ON CONFLICT(msgid) DO UPDATE SET expires = excluded.expires"
)
DELETE_IF_TOMBSTONED = (
    "DELETE FROM mqtt_msg WHERE msgid = ?1 AND EXISTS "
    "(SELECT 1 FROM mqtt_replay_tombstone WHERE msgid = ?1 AND expires > ?2)"
)
# One entry, the oldest: the same message replayed to two subscribers is registered
# twice, and each of its returns removes only its own entry.
DROP_PENDING = (
    "DELETE FROM mqtt_replay_pending WHERE id = (SELECT id FROM mqtt_replay_pending "
    "WHERE topic = ? AND digest = ? AND msgid = ? ORDER BY id LIMIT 1)"
)

_MARK = "SELECT position, expires FROM mqtt_replay_mark WHERE connection = ? AND topic = ?"
_RAISE_MARK = (
    "INSERT INTO mqtt_replay_mark(connection, topic, position, expires) VALUES (?, ?, ?, ?) "
    "ON CONFLICT(connection, topic) DO UPDATE SET position = excluded.position, expires = excluded.expires"
)
_REGISTER = "INSERT INTO mqtt_replay_pending(topic, digest, msgid, expires) VALUES (?, ?, ?, ?)"
_OLDEST_PENDING = (
    "SELECT id, msgid FROM mqtt_replay_pending WHERE topic = ? AND digest = ? AND expires > ? "
    "ORDER BY id LIMIT 1"
)


def claim(
    conn: sqlite3.Connection, connection: str, highs: dict[str, float], now_ms: int
) -> dict[str, float | None]:
    """Raise the marks of ``connection`` to ``highs`` (never lower); the previous
    unexpired marks. Atomic because the caller's transaction is ``BEGIN IMMEDIATE``."""
    expires = now_ms + REPLAY_MARK_TTL_S * 1000
    previous: dict[str, float | None] = {}
    marks: list[tuple[str, str, float, int]] = []
    for topic, high in highs.items():
        row = conn.execute(_MARK, (connection, topic)).fetchone()
        old = float(row[0]) if row is not None and row[1] > now_ms else None
        previous[topic] = old
        marks.append((connection, topic, high if old is None else max(old, high), expires))
    conn.executemany(_RAISE_MARK, marks)
    return previous


def reset_marks(conn: sqlite3.Connection, connection: str) -> None:
    conn.execute("DELETE FROM mqtt_replay_mark WHERE connection = ?", (connection,))


def register_pending(conn: sqlite3.Connection, items: Sequence[PendingReplay], now_ms: int) -> None:
    expires = now_ms + PENDING_REPLAY_TTL_S * 1000
    conn.executemany(_REGISTER, [(item.topic, item.digest, item.msgid, expires) for item in items])


def take_pending(conn: sqlite3.Connection, topic: str, digest: str, now_ms: int) -> str | None:
    """Pop the oldest unexpired entry for this topic and payload digest."""
    row = conn.execute(_OLDEST_PENDING, (topic, digest, now_ms)).fetchone()
    if row is None:
        return None
    conn.execute("DELETE FROM mqtt_replay_pending WHERE id = ?", (row[0],))
    return str(row[1])
