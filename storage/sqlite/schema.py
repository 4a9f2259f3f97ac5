"""The SQLite file's tables: created when missing, verified when present.

Schema (the MySQL plugin's tables, plus this service's bookkeeping)::

    mqtt_msg(id INTEGER PRIMARY KEY AUTOINCREMENT, msgid TEXT UNIQUE, topic, sender,
             qos, retain 0/1, payload BLOB, arrived INTEGER = broker timestamp in ms)
      index (topic) [= (topic, id)], unique index (msgid), index (arrived)
    mqtt_sub(clientid, topic, qos, PRIMARY KEY (clientid, topic))
    mqtt_replay_mark(connection, topic, position, expires)       -- claim_replay
    mqtt_replay_tombstone(msgid PRIMARY KEY, expires)             -- replay acks
    mqtt_replay_pending(id, topic, digest, msgid, expires)        -- v2 registry

``AUTOINCREMENT`` matters: ids (= positions) are never reused, even after the
newest row was deleted, so replay marks stay meaningful. ``arrived`` holds the
broker's timestamp in milliseconds (MySQL's column is a DATETIME); a message
without a timestamp gets the time it was written. ``expires`` columns are epoch
milliseconds; expired bookkeeping is ignored when read and deleted by
``purge_expired``.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from storage.base import StoreConfigError

SCHEMA_VERSION = 1

_DDL = (
    """CREATE TABLE IF NOT EXISTS mqtt_msg (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        msgid TEXT NOT NULL,
        topic TEXT NOT NULL,
        sender TEXT NOT NULL DEFAULT '',
        qos INTEGER NOT NULL,
        retain INTEGER NOT NULL DEFAULT 0,
        payload BLOB NOT NULL,
        arrived INTEGER NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS mqtt_msg_topic ON mqtt_msg(topic)",
    "CREATE UNIQUE INDEX IF NOT EXISTS mqtt_msg_msgid ON mqtt_msg(msgid)",
    "CREATE INDEX IF NOT EXISTS mqtt_msg_arrived ON mqtt_msg(arrived)",
    """CREATE TABLE IF NOT EXISTS mqtt_sub (
        clientid TEXT NOT NULL,
        topic TEXT NOT NULL,
        qos INTEGER NOT NULL,
        PRIMARY KEY (clientid, topic)
    )""",
    """CREATE TABLE IF NOT EXISTS mqtt_replay_mark (
        connection TEXT NOT NULL,
        topic TEXT NOT NULL,
        position REAL NOT NULL,
        expires INTEGER NOT NULL,
        PRIMARY KEY (connection, topic)
    )""",
    "CREATE INDEX IF NOT EXISTS mqtt_replay_mark_expires ON mqtt_replay_mark(expires)",
    """CREATE TABLE IF NOT EXISTS mqtt_replay_tombstone (
        msgid TEXT PRIMARY KEY,
        expires INTEGER NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS mqtt_replay_tombstone_expires ON mqtt_replay_tombstone(expires)",
    """CREATE TABLE IF NOT EXISTS mqtt_replay_pending (
        id INTEGER PRIMARY KEY,
        topic TEXT NOT NULL,
        digest TEXT NOT NULL,
        msgid TEXT NOT NULL,
        expires INTEGER NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS mqtt_replay_pending_key ON mqtt_replay_pending(topic, digest)",
    "CREATE INDEX IF NOT EXISTS mqtt_replay_pending_expires ON mqtt_replay_pending(expires)",
)

_REQUIRED_COLUMNS = {
    "mqtt_msg": {"id", "msgid", "topic", "sender", "qos", "retain", "payload", "arrived"},
    "mqtt_sub": {"clientid", "topic", "qos"},
}


@dataclass(frozen=True, slots=True)
class Schema:
    """What ``open`` found: the schema version and the largest string or blob a
    connection binds (``SQLITE_LIMIT_LENGTH``, 1e9 bytes unless SQLite was built
    otherwise): a longer value is refused by SQLite, so writes check it first."""

    version: int
    max_length: int


def prepare(conn: sqlite3.Connection, where: str) -> Schema:
    """Create missing tables and check existing ones, in one write transaction (two
    processes opening one new file create it once). ``where`` names the file in errors."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise StoreConfigError(
                f"sqlite {where}: schema version {version} is newer than this service's ({SCHEMA_VERSION})"
            )
        for statement in _DDL:
            conn.execute(statement)
        _check_columns(conn, where)
        if version < SCHEMA_VERSION:
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return Schema(version=SCHEMA_VERSION, max_length=conn.getlimit(sqlite3.SQLITE_LIMIT_LENGTH))


def _check_columns(conn: sqlite3.Connection, where: str) -> None:
    """A table created by an older or foreign tool must still have every column used."""
    for table, required in _REQUIRED_COLUMNS.items():
        have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        missing = required - have
        if missing:
            raise StoreConfigError(f"sqlite {where}: table {table} lacks columns {', '.join(sorted(missing))}")
