"""What a store holds, read with the plain client of each database (sqlite3, PyMySQL,
redis-py), never with the service's own store code: the reliability tests check that
what the service answered is really there, byte for byte."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any

import pymysql

from storage.base62 import msgid_to_b62
from storage.redis.permissions import PROBE_TAG
from tests.e2e.backends import MYSQL, BackendUnderTest, MysqlBackend, RedisBackend, SqliteBackend


@dataclass(frozen=True, slots=True)
class Row:
    """One stored message; ``key`` is its id as the store writes it (the hex GUID in
    SQL, its base62 form in Redis, the plugin's layout)."""

    key: str
    sender: str
    topic: str
    qos: int
    payload: bytes


def store_key(backend: BackendUnderTest, msgid: str) -> str:
    if not isinstance(backend, RedisBackend):
        return msgid
    try:
        return msgid_to_b62(msgid)
    except ValueError:
        return f"(no Redis key: {msgid!r})"  # an id that is not a broker GUID cannot be in the layout


def _text(value: Any) -> str:
    return value.decode("utf-8", "surrogatepass") if isinstance(value, (bytes, bytearray)) else str(value)


def _bytes(value: bytes | str) -> bytes:
    assert isinstance(value, bytes)
    return value


def _sql_rows(rows: list[tuple[Any, ...]]) -> list[Row]:
    return [Row(_text(r[0]), _text(r[1] or ""), _text(r[2]), int(r[3]), bytes(r[4] or b"")) for r in rows]


def sqlite_rows(path: str) -> list[Row]:
    with sqlite3.connect(path) as conn:
        return _sql_rows(conn.execute("select msgid, sender, topic, qos, payload from mqtt_msg order by id").fetchall())


def mysql_rows(database: str, host: str = "127.0.0.1", port: int = 3306) -> list[Row]:
    conn = pymysql.connect(host=host, port=port, user=MYSQL["user"], password=MYSQL["password"], database=database,
                           max_allowed_packet=64 * 1024 * 1024)
    try:
        with conn.cursor() as cur:
            cur.execute("select msgid, sender, topic, qos, payload from mqtt_msg order by id")
            return _sql_rows(list(cur.fetchall()))
    finally:
        conn.close()


async def redis_rows(backend: RedisBackend) -> list[Row]:
    out = []
    prefix = backend.msg_prefix.encode() + b":"
    async for key in backend.client.scan_iter(match=prefix + b"*", count=1000):
        if PROBE_TAG in key or await backend.client.type(key) != b"hash":
            continue  # the per-topic index zsets share the prefix, as do the start-up permission probes
        fields = await backend.client.hgetall(key)
        if not fields:
            continue  # deleted since the scan saw it (an ack being applied)
        out.append(Row(_text(fields[b"id"]), _text(fields.get(b"from", b"")), _text(fields[b"topic"]),
                       int(fields[b"qos"]), _bytes(fields[b"payload"])))
    return out


async def stored_rows(backend: BackendUnderTest) -> list[Row]:
    if isinstance(backend, SqliteBackend):
        return sqlite_rows(str(backend.path))
    if isinstance(backend, MysqlBackend):
        server = getattr(backend, "server", None)
        return mysql_rows(backend.database, port=server.port if server is not None else 3306)
    assert isinstance(backend, RedisBackend)
    return await redis_rows(backend)


async def stored_subscriptions(backend: BackendUnderTest, clientid: str) -> dict[str, int]:
    """The client's stored subscriptions: filter -> qos."""
    if isinstance(backend, SqliteBackend):
        with sqlite3.connect(backend.path) as conn:
            rows = conn.execute("select topic, qos from mqtt_sub where clientid = ?", (clientid,)).fetchall()
        return {t: int(q) for t, q in rows}
    if isinstance(backend, MysqlBackend):
        conn = pymysql.connect(host="127.0.0.1", user=MYSQL["user"], password=MYSQL["password"],
                               database=backend.database)
        try:
            with conn.cursor() as cur:
                cur.execute("select topic, qos from mqtt_sub where clientid = %s", (clientid,))
                return {_text(t): int(q) for t, q in cur.fetchall()}
        finally:
            conn.close()
    assert isinstance(backend, RedisBackend)
    fields = await backend.client.hgetall(f"{backend.sub_prefix}:{clientid}".encode())
    return {_text(t): int(q) for t, q in fields.items()}
