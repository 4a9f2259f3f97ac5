"""Shared fixtures and helpers of the MySQL store tests (tests/test_mysql_*.py), against
the real MariaDB on 127.0.0.1:3306 (root, no password).

Registered in tests/conftest.py: each test module works in its own database
``ox_<random>`` (dropped afterwards), and each test starts from an empty database.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aiomysql
import pymysql
import pytest

from storage.base import WriteRejected
from storage.config import DEFAULT_SQL, MysqlConfig
from storage.model import StoredMessage, WriteOp
from storage.mysql import MysqlStore
from tests.store_reads import read_all

ROOT: dict[str, Any] = {"host": "127.0.0.1", "port": 3306, "user": "root", "password": ""}


def _raw(database: str | None = None) -> pymysql.connections.Connection:
    return pymysql.connect(**ROOT, database=database, autocommit=True)


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    conn = _raw()  # `make test` starts MariaDB; its absence is a failure, not a skip
    name = f"ox_{secrets.token_hex(5)}"
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{name}`")
    try:
        yield name
    finally:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        conn.close()


@pytest.fixture
def raw(database: str) -> Iterator[pymysql.connections.Connection]:
    """A plain connection to the test database, emptied first."""
    conn = _raw(database)
    with conn.cursor() as cur:
        cur.execute("SHOW TABLES")
        for (table,) in cur.fetchall():
            cur.execute(f"DROP TABLE `{table}`")
    yield conn
    conn.close()


def q(conn: pymysql.connections.Connection, sql: str, args: Any = None) -> list[tuple[Any, ...]]:
    with conn.cursor() as cur:
        cur.execute(sql, args)
        return list(cur.fetchall())


MakeStore = Callable[..., Any]


@pytest.fixture
async def make_store(database: str, raw: pymysql.connections.Connection) -> AsyncIterator[MakeStore]:
    stores: list[MysqlStore] = []

    async def make(open_: bool = True, sql: dict[str, str] | None = None, **kw: Any) -> MysqlStore:
        kw.setdefault("database", database)
        kw.setdefault("init_default_schema", True)
        kw.setdefault("pool_size", 3)
        store = MysqlStore(MysqlConfig(sql={**DEFAULT_SQL, **(sql or {})}, **kw))
        stores.append(store)
        if open_:
            await store.open()
        return store

    yield make
    for store in stores:
        await store.close()


_counter = iter(range(1, 1 << 30))


def msg(topic: str = "t/1", payload: bytes = b"hello", *, ts: int | None = None, sender: str = "pub",
        msgid: str | None = None, retain: bool = False, qos: int = 1) -> StoredMessage:
    return StoredMessage(msgid or f"{next(_counter):032X}", sender, topic, qos, retain, payload,
                         int(time.time() * 1000) if ts is None else ts)


def ids() -> str:
    """A fresh message id (32 hex digits, as the broker makes them)."""
    return f"{next(_counter):032X}"


async def read_topic(store: MysqlStore, topic: str) -> list[StoredMessage]:
    return await read_all(store, {topic: (None, 1e15)})


def spy_statements(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every statement text executed through aiomysql cursors."""
    seen: list[str] = []
    original = aiomysql.Cursor.execute

    async def execute(self: Any, query: str, args: Any = None) -> Any:
        seen.append(query)
        return await original(self, query, args)

    monkeypatch.setattr(aiomysql.Cursor, "execute", execute)
    return seen


async def rejected(store: MysqlStore, ops: list[WriteOp]) -> WriteRejected:
    """The ``WriteRejected`` that writing ``ops`` raises (one line, naming the backend)."""
    with pytest.raises(WriteRejected) as err:
        await store.write(ops)
    assert "\n" not in str(err.value) and str(err.value).startswith("mysql: ")
    return err.value


async def write_isolating(store: MysqlStore, ops: list[WriteOp]) -> list[tuple[WriteOp, str]]:
    """Write ``ops`` as the ordered writer does: an op refused by index is set aside and
    the rest written again; a refusal without an index splits the batch in halves
    until the op is found. Returns the set-aside ops with their reasons."""
    refused: list[tuple[WriteOp, str]] = []

    async def attempt(part: list[WriteOp]) -> None:
        if not part:
            return
        try:
            await store.write(part)
        except WriteRejected as exc:
            assert "\n" not in str(exc)
            if exc.index is not None:
                refused.append((part[exc.index], exc.reason))
                await attempt(part[: exc.index] + part[exc.index + 1 :])
            elif len(part) == 1:
                refused.append((part[0], exc.reason))
            else:
                await attempt(part[: len(part) // 2])
                await attempt(part[len(part) // 2 :])

    await attempt(list(ops))
    return refused
