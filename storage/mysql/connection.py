"""The connection pool: one connection per operation, under a deadline, every failure
classified (``errors.py``), transactions repeated after a deadlock, and once after a
lost connection where the caller says a repeat is safe."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import aiomysql
import pymysql

from storage.base import StoreConfigError, StoreError, WriteRejected
from storage.config import MysqlConfig
from storage.mysql import tls_guard
from storage.mysql.errors import Deadlock, classify, connection_lost, describe_error, error_code, refused_by_server
from storage.retry import Backoff, RetryPolicy
from storage.tls import TlsSetupError, client_context

log = logging.getLogger(__name__)
T = TypeVar("T")
tls_guard.install()

# The server rolled the transaction back: repeat it at once, a few times (short
# pauses with jitter so that two deadlocked transactions do not collide again).
_DEADLOCKS = RetryPolicy(Backoff(base=0.005, cap=0.1), attempts=5, retryable=lambda exc: isinstance(exc, Deadlock))
# Sessions add STRICT_ALL_TABLES to the server's sql_mode: without it a value a column
# cannot hold is cut or zeroed with a warning, and a replay would deliver a different
# topic or payload than was published. (aiomysql sends "SET sql_mode=<this>" as is.)
_STRICT_SQL_MODE = "CONCAT_WS(',', NULLIF(@@SESSION.sql_mode, ''), 'STRICT_ALL_TABLES')"


class Connections:
    """An aiomysql pool of up to ``pool_size`` connections, opened on demand."""

    def __init__(self, config: MysqlConfig, op_timeout_s: float) -> None:
        self._cfg = config
        self._timeout = op_timeout_s
        self._pool: Any = None
        self.tls = config.ssl.enable
        self.where = f"mysql ({config.server}, database {config.database!r})"

    @property
    def pool(self) -> Any:
        return self._pool

    async def open(self) -> None:
        """Create the pool; raise ``StoreConfigError`` / ``StoreError`` with one line."""
        cfg = self._cfg
        try:
            ssl_ctx = client_context(cfg.ssl, "mysql.ssl") if cfg.ssl.enable else None
        except TlsSetupError as exc:
            raise StoreConfigError(str(exc)) from None
        try:
            self._pool = await asyncio.wait_for(
                aiomysql.create_pool(
                    minsize=1, maxsize=cfg.pool_size, pool_recycle=3600,
                    host=cfg.server.host, port=cfg.server.port, user=cfg.username, password=cfg.password,
                    db=cfg.database, charset="utf8mb4", autocommit=True, ssl=ssl_ctx, connect_timeout=10,
                    local_infile=False, sql_mode=_STRICT_SQL_MODE,
                    # Our transactions rely on next-key locks (claims, tombstones).
                    init_command="SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ",
                ),
                self._timeout,
            )
        except Exception as exc:
            raise self._open_error(exc) from None

    def _open_error(self, exc: BaseException) -> StoreError:
        if tls_guard.refused(exc):
            return StoreConfigError(f"mysql.ssl.enable: the server at {self._cfg.server} did not offer TLS; "
                                    "nothing was sent, credentials included")
        code = error_code(exc)
        text = describe_error(exc)
        if code == 1049:
            return StoreConfigError(f"mysql.database: unknown database {self._cfg.database!r}")
        if code in (1045, 1698):
            return StoreConfigError(f"mysql.username / mysql.password: {text}")
        if isinstance(classify(exc), StoreConfigError):
            return StoreConfigError(f"{self.where}: {text}")
        if isinstance(exc, TimeoutError):
            return StoreError(f"{self.where}: no answer within {self._timeout:.0f} s")
        return StoreError(f"{self.where}: cannot connect: {text}")

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        pool.close()
        try:
            await asyncio.wait_for(pool.wait_closed(), 5)
        except Exception:
            pool.terminate()

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Any]:
        """A pooled connection for one operation, under the deadline. A failure about
        the statement (a refused value, a missing table) rolls back and keeps the
        connection; any other closes it (it may be broken or mid-transaction: the
        server rolls an open transaction back when the connection goes). Every
        failure leaves as a classified ``StoreError``."""
        pool = self._pool
        if pool is None:
            raise StoreError("mysql: store is not open")
        try:
            async with asyncio.timeout(self._timeout):
                conn = await pool.acquire()
                try:
                    yield conn
                except BaseException as exc:
                    await _discard_or_roll_back(conn, exc)
                    raise
                finally:
                    pool.release(conn)
        except StoreError:
            raise
        except TimeoutError:
            raise StoreError(f"mysql: no answer within {self._timeout:.0f} s") from None
        except (pymysql.err.Error, OSError, ssl.SSLError, RuntimeError, UnicodeError) as exc:
            raise classify(exc) from exc

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Any]:
        """A cursor inside BEGIN ... COMMIT."""
        async with self.connection() as conn, conn.cursor() as cur:
            await conn.begin()
            yield cur
            await conn.commit()

    async def retrying(self, fn: Callable[[], Awaitable[T]], safe_to_repeat: Callable[[], bool] | None) -> T:
        """Run ``fn()`` (one operation / transaction), again after a deadlock, and once
        more after a lost connection when ``safe_to_repeat()`` says so: a pooled
        connection can be dead without the pool knowing yet (e.g. just after a
        MariaDB restart)."""
        try:
            return await _DEADLOCKS.call("mysql transaction", fn)
        except StoreError as exc:
            if safe_to_repeat is None or not connection_lost(exc) or not safe_to_repeat():
                raise
            log.info("%s; retrying once on a new connection", exc)
        # The idle connections most likely died with this one (server restart, network
        # cut): drop them rather than find out one failure at a time.
        self.drop_idle_connections()
        return await _DEADLOCKS.call("mysql transaction", fn)

    def drop_idle_connections(self) -> None:
        # aiomysql's Pool.clear() says goodbye on each connection and stops at the
        # first dead one; closing the transports is what we need.
        free = getattr(self._pool, "_free", None)
        while free:
            free.popleft().close()

    async def query(
        self, sql: str, args: tuple[object, ...], *, dict_rows: bool = False, repeat: bool = True
    ) -> list[Any]:
        """One statement (autocommit); ``repeat``: it is safe to run it twice."""

        async def once() -> list[Any]:
            cursor_class = aiomysql.DictCursor if dict_rows else aiomysql.Cursor
            async with self.connection() as conn, conn.cursor(cursor_class) as cur:
                await cur.execute(sql, args)
                return list(await cur.fetchall())

        return await self.retrying(once, (lambda: True) if repeat else None)


async def _discard_or_roll_back(conn: Any, exc: BaseException) -> None:
    """After the server refused a statement (a value, a missing column, a deadlock)
    the connection is healthy: roll back now, releasing the transaction's locks, and
    keep it (a batch that is being split finds its bad op in several tries). After
    anything else (lost, timed out, cancelled) it may be broken or mid-transaction:
    close it; the server rolls back when it notices."""
    refused = exc.__cause__ if isinstance(exc, WriteRejected) else exc
    if refused is not None and refused_by_server(refused):
        try:
            await conn.rollback()
            return
        except Exception:
            pass  # broken after all
    conn.close()
