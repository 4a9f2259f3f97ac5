"""Failures of the MySQL store that trying again can cure are retryable ``StoreError``s,
never ``WriteRejected`` (issue 10): a server stopped or frozen, a read-only server,
too many connections, lock waits (repeated inside the store first); a privilege
taken away under a running store is a ``StoreConfigError``. On a private mariadbd
(tests/mysql_tls.py, no TLS) on a free loopback port, stopped / SIGSTOPped by PID.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pymysql
import pytest

import storage.mysql.connection as mysql_connection
from storage.base import StoreConfigError, StoreError, WriteRejected
from storage.config import HostPort, MysqlConfig
from storage.model import DeleteMessage, RekeyMessage, SaveMessage
from storage.mysql import DEFAULT_SCHEMA_DDL, MysqlStore
from storage.mysql.errors import Deadlock
from storage.retry import Backoff, RetryPolicy
from tests.mysql_fixtures import ids, msg, q, read_topic
from tests.mysql_tls import MariaDbServer, tools_available

SECRET = "wr1ter-S3cret-pw"
TABLES = ("mqtt_msg", "mqtt_sub", "mqtt_replay_mark", "mqtt_replay_tombstone", "mqtt_replay_pending")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MariaDbServer]:
    """A private mariadbd with database `mqtt` and a user `writer` that has table
    privileges only (they take effect at once on open connections)."""
    assert tools_available(), "mariadbd / mariadb-install-db not available"
    mariadb = MariaDbServer(tmp_path_factory.mktemp("mariadb-transient"), None, require_tls=False)
    try:
        mariadb.install()
        mariadb.start()
        with mariadb.connect() as conn:
            q(conn, "CREATE DATABASE mqtt")
            q(conn, "USE mqtt")
            for ddl in DEFAULT_SCHEMA_DDL:
                q(conn, ddl)
            q(conn, "CREATE USER 'writer'@'127.0.0.1' IDENTIFIED BY %s", (SECRET,))
            for table in TABLES:
                q(conn, f"GRANT SELECT, INSERT, UPDATE, DELETE ON mqtt.{table} TO 'writer'@'127.0.0.1'")
        yield mariadb
    finally:
        mariadb.stop()


@pytest.fixture
def root(server: MariaDbServer) -> Iterator[pymysql.connections.Connection]:
    conn = server.connect("mqtt")
    conn.autocommit(True)
    yield conn
    conn.close()


@pytest.fixture
async def store(server: MariaDbServer) -> AsyncIterator[MysqlStore]:
    config = MysqlConfig(server=HostPort("127.0.0.1", server.port), username="writer", password=SECRET,
                         database="mqtt", pool_size=2)
    made = MysqlStore(config, op_timeout_s=2.0)
    await made.open()
    yield made
    await made.close()


def assert_transient(exc: BaseException) -> None:
    assert isinstance(exc, StoreError) and exc.retryable, exc
    assert not isinstance(exc, (WriteRejected, StoreConfigError)), exc
    assert "\n" not in str(exc) and SECRET not in str(exc)


async def test_read_only_server(store: MysqlStore, root: Any) -> None:
    q(root, "SET GLOBAL read_only = 1")
    try:
        with pytest.raises(StoreError, match=r"\[1290\]") as err:
            await store.write([SaveMessage(msg("ro/t"))])
        assert_transient(err.value)
    finally:
        q(root, "SET GLOBAL read_only = 0")
    m = msg("ro/t")
    await store.write([SaveMessage(m)])  # the caller's retry, once the server is writable
    assert [x.msgid for x in await read_topic(store, "ro/t")] == [m.msgid]


async def test_frozen_then_stopped_server(server: MariaDbServer, store: MysqlStore) -> None:
    assert server.proc is not None
    await store.ping()
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        with pytest.raises(StoreError, match="no answer within") as err:
            await store.write([SaveMessage(msg("down/t"))])
        assert_transient(err.value)
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    await store.write([SaveMessage(msg("down/t"))])
    server.stop()
    try:
        for call in (store.write([SaveMessage(msg("down/t"))]), store.ping()):
            with pytest.raises(StoreError) as err:
                await call
            assert_transient(err.value)
    finally:
        server.start()
    m = msg("down/t")
    await store.write([SaveMessage(m)])
    assert m.msgid in [x.msgid for x in await read_topic(store, "down/t")]


async def test_too_many_connections(server: MariaDbServer, store: MysqlStore, root: Any) -> None:
    q(root, "SET GLOBAL max_connections = 10")  # the server's minimum
    others: list[pymysql.connections.Connection] = []
    other = MysqlStore(MysqlConfig(server=HostPort("127.0.0.1", server.port), username="writer",
                                   password=SECRET, database="mqtt"))
    try:
        with pytest.raises(pymysql.err.OperationalError, match="1040"):  # fill the server up
            for _ in range(20):
                others.append(pymysql.connect(host="127.0.0.1", port=server.port, user="writer", password=SECRET))
        with pytest.raises(StoreError, match=r"\[1040\]") as err:
            await other.open()
        assert_transient(err.value)
    finally:
        q(root, "SET GLOBAL max_connections = 60")
        for conn in others:
            conn.close()
        await other.close()
    await other.open()
    await other.close()


async def test_privilege_taken_away_under_a_running_store(store: MysqlStore, root: Any) -> None:
    await store.write([SaveMessage(msg("acl/t"))])
    q(root, "REVOKE INSERT ON mqtt.mqtt_msg FROM 'writer'@'127.0.0.1'")
    try:
        with pytest.raises(StoreConfigError, match=r"\[1142\]") as err:
            await store.write([SaveMessage(msg("acl/t"))])
        assert not isinstance(err.value, WriteRejected) and SECRET not in str(err.value)
    finally:
        q(root, "GRANT INSERT ON mqtt.mqtt_msg TO 'writer'@'127.0.0.1'")
    await store.write([SaveMessage(msg("acl/t"))])


@pytest.fixture
async def lock_waits(root: Any, server: MariaDbServer) -> AsyncIterator[MysqlStore]:
    """A store whose sessions give up waiting for a row lock after 1 s."""
    q(root, "SET GLOBAL innodb_lock_wait_timeout = 1")
    config = MysqlConfig(server=HostPort("127.0.0.1", server.port), username="writer", password=SECRET,
                         database="mqtt", pool_size=2)
    made = MysqlStore(config)
    try:
        await made.open()
        yield made
    finally:
        await made.close()
        q(root, "SET GLOBAL innodb_lock_wait_timeout = 50")


def hold_tombstone(server: MariaDbServer, msgid: str) -> pymysql.connections.Connection:
    """Another client's transaction holding the row lock of ``msgid``'s tombstone."""
    holder = server.connect("mqtt")
    q(holder, "INSERT INTO mqtt_replay_tombstone (msgid, expires) VALUES (%s, 0)", (msgid,))
    holder.commit()
    q(holder, "SELECT * FROM mqtt_replay_tombstone WHERE msgid = %s FOR UPDATE", (msgid,))
    return holder


async def test_lock_wait_is_repeated_inside_the_store(
    server: MariaDbServer, lock_waits: MysqlStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    m, new = msg("lock/t"), ids()
    await lock_waits.write([SaveMessage(m)])
    holder = hold_tombstone(server, new)
    waits: list[StoreError] = []
    classify = mysql_connection.classify

    def classify_and_release(exc: BaseException) -> StoreError:
        result = classify(exc)
        if isinstance(result, Deadlock):
            waits.append(result)
            holder.commit()  # the other transaction ends after our first wait
        return result

    monkeypatch.setattr(mysql_connection, "classify", classify_and_release)
    try:
        await lock_waits.write([RekeyMessage(m.msgid, new, m.topic), DeleteMessage(new, m.topic)])
    finally:
        holder.close()
    assert len(waits) == 1 and "[1205]" in str(waits[0])
    assert await read_topic(lock_waits, "lock/t") == []


async def test_lock_wait_beyond_the_repeats_is_transient(
    server: MariaDbServer, lock_waits: MysqlStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    m, new = msg("lock/t"), ids()
    await lock_waits.write([SaveMessage(m)])
    monkeypatch.setattr(mysql_connection, "_DEADLOCKS", RetryPolicy(
        Backoff(0.001, 0.001), attempts=2, retryable=lambda exc: isinstance(exc, Deadlock)))
    holder = hold_tombstone(server, new)
    try:
        with pytest.raises(StoreError, match=r"\[1205\]") as err:
            await lock_waits.write([RekeyMessage(m.msgid, new, m.topic)])
    finally:
        holder.close()
    assert_transient(err.value)
    await lock_waits.write([RekeyMessage(m.msgid, new, m.topic)])  # the caller's retry
    assert [x.msgid for x in await read_topic(lock_waits, "lock/t")] == [new]


async def test_server_errors_never_carry_the_password(server: MariaDbServer) -> None:
    wrong = MysqlStore(MysqlConfig(server=HostPort("127.0.0.1", server.port), username="writer",
                                   password=SECRET + "x", database="mqtt"))
    with pytest.raises(StoreConfigError) as err:
        await wrong.open()
    assert "[1045]" in str(err.value) and SECRET not in str(err.value) and "\n" not in str(err.value)


async def test_a_claim_the_server_refused_is_not_in_doubt(store: MysqlStore, root: Any) -> None:
    """A refusal (here: read-only) was rolled back: the next claim gets the real previous
    mark, not "from the oldest" (which would replay everything again)."""
    assert await store.claim_replay("ro-claim", {"ro/t": 5.0}) == {"ro/t": None}
    q(root, "SET GLOBAL read_only = 1")
    try:
        with pytest.raises(StoreError, match=r"\[1290\]"):
            await store.claim_replay("ro-claim", {"ro/t": 9.0})
    finally:
        q(root, "SET GLOBAL read_only = 0")
    assert await store.claim_replay("ro-claim", {"ro/t": 9.0}) == {"ro/t": 5.0}


async def test_claims_during_a_frozen_server_run_one_check_of_the_statement(
        server: MariaDbServer, monkeypatch: pytest.MonkeyPatch) -> None:
    config = MysqlConfig(server=HostPort("127.0.0.1", server.port), username="writer", password=SECRET,
                         database="mqtt", pool_size=4)
    fresh = MysqlStore(config, op_timeout_s=1.0)
    await fresh.open()
    checks = []
    check = fresh._bookkeeping.check_single_statement_claim

    async def counted() -> None:
        checks.append(1)
        await check()

    monkeypatch.setattr(fresh._bookkeeping, "check_single_statement_claim", counted)
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        results = await asyncio.gather(*[fresh.claim_replay(f"frozen-{i}", {"fz/t": 5.0}) for i in range(4)],
                                       return_exceptions=True)
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    assert all(isinstance(r, StoreError) for r in results), results
    assert len(checks) == 1  # the others took the transaction instead of trying the check again
    assert fresh._bookkeeping.single_statement_claims is None  # tried again once the pause is over
    assert not fresh._bookkeeping._in_doubt  # neither the check nor a claim that never began is in doubt
    await fresh.close()
