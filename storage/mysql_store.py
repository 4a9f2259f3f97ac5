"""MySQL / MariaDB backend (aiomysql) driven by the Erlang plugin's SQL templates.

Tables: the plugin's ``mqtt_msg`` / ``mqtt_sub`` (or whatever the operator's templates
name) plus this service's ``mqtt_replay_mark`` / ``mqtt_replay_tombstone`` /
``mqtt_replay_pending`` for replay bookkeeping. The DDL, what
each template is used for and how the paged / wildcard reads work are documented in
``docs/mysql-schema.md``; the short version:

* every ``${placeholder}`` is a bound parameter (``storage/sql_template.py``);
* rows of ``select_message_sql`` / ``select_subscriptions_sql`` are read by column
  name (``msgid, sender, topic, qos, retain, payload, arrived, id``); paged replay
  reads wrap ``select_message_sql`` in a derived table
  (``SELECT ... FROM (<select_message_sql>) AS m WHERE m.id > ? ... ORDER BY m.id``),
  which MariaDB/MySQL merge into the outer query, so the topic index is used;
* wildcard discovery (``stored_topics``) and TTL purging address the message table
  directly; its name and its topic / msgid / time columns come from
  ``insert_message_sql`` when that is a plain ``insert into t(cols) values(...)``;
* one ``write(ops)`` = one transaction, consecutive saves = one multi-row INSERT
  (split only to stay under ``max_allowed_packet``).
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import logging
import math
import ssl
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import aiomysql
import pymysql

from storage.base import (
    PENDING_REPLAY_TTL_S,
    REPLAY_MARK_TTL_S,
    TOMBSTONE_TTL_S,
    Store,
    StoreConfigError,
    StoreError,
)
from storage.config import MysqlConfig
from storage.errors import joined
from storage.model import (
    DeleteMessage,
    PendingReplay,
    RekeyMessage,
    SaveMessage,
    StoredMessage,
    Subscription,
    WriteOp,
)
from storage.sql_template import (
    PlainInsert,
    SqlTemplate,
    SqlTemplateError,
    compile_template,
    first_table,
    message_values,
    parse_delete_by_id,
    parse_insert,
    parse_plain_insert,
    quote_ident,
    subscription_values,
)
from storage.tls import TlsSetupError, client_context

log = logging.getLogger(__name__)
_T = TypeVar("_T")

# The plugin's DDL (emqx_offline_messages_mysql INIT_SQL) with two compatible
# changes, see docs/mysql-schema.md: payload is LONGBLOB (BLOB holds only 64 KiB,
# EMQX's default max_packet_size is 1 MB) and msgid is indexed (every ack and
# re-key looks a message up by msgid).
MESSAGE_TABLE_DDL = (
    "CREATE TABLE IF NOT EXISTS `mqtt_msg` ("
    "`id` bigint unsigned NOT NULL AUTO_INCREMENT,"
    "`msgid` varchar(64) DEFAULT NULL,"
    "`topic` varchar(180) NOT NULL,"
    "`sender` varchar(64) DEFAULT NULL,"
    "`qos` tinyint(1) NOT NULL DEFAULT '0',"
    "`retain` tinyint(1) DEFAULT NULL,"
    "`payload` longblob,"
    "`arrived` datetime NOT NULL,"
    "PRIMARY KEY (`id`),"
    "INDEX topic_index(`topic`),"
    "INDEX msgid_index(`msgid`)"
    ") ENGINE=InnoDB DEFAULT CHARSET=utf8MB4"
)
SUBSCRIPTION_TABLE_DDL = (
    "CREATE TABLE IF NOT EXISTS `mqtt_sub` ("
    "`clientid` varchar(64) NOT NULL,"
    "`topic` varchar(180) NOT NULL,"
    "`qos` tinyint(1) NOT NULL DEFAULT '0',"
    "PRIMARY KEY (`clientid`, `topic`)"
    ") ENGINE=InnoDB DEFAULT CHARSET=utf8MB4"
)
# This service's bookkeeping (the same three tables as the SQLite backend). Keys
# that can be long (connection ids, topics) are SHA-256 digests; ``expires`` is
# unix seconds on the server's clock (UNIX_TIMESTAMP()), so instances with skewed
# clocks agree.
MARK_TABLE = "mqtt_replay_mark"
TOMBSTONE_TABLE = "mqtt_replay_tombstone"
PENDING_TABLE = "mqtt_replay_pending"
MARK_TABLE_DDL = (
    "CREATE TABLE IF NOT EXISTS `mqtt_replay_mark` ("
    "`conn_hash` binary(32) NOT NULL,"
    "`topic_hash` binary(32) NOT NULL,"
    "`position` double DEFAULT NULL,"
    "`expires` bigint NOT NULL,"
    "PRIMARY KEY (`conn_hash`, `topic_hash`),"
    "INDEX mqtt_replay_mark_expires(`expires`)"
    ") ENGINE=InnoDB"
)
TOMBSTONE_TABLE_DDL = (
    "CREATE TABLE IF NOT EXISTS `mqtt_replay_tombstone` ("
    "`msgid` varchar(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,"
    "`expires` bigint NOT NULL,"
    "PRIMARY KEY (`msgid`),"
    "INDEX mqtt_replay_tombstone_expires(`expires`)"
    ") ENGINE=InnoDB"
)
PENDING_TABLE_DDL = (
    "CREATE TABLE IF NOT EXISTS `mqtt_replay_pending` ("
    "`id` bigint unsigned NOT NULL AUTO_INCREMENT,"
    "`key_hash` binary(32) NOT NULL,"
    "`msgid` varchar(64) NOT NULL,"
    "`expires` bigint NOT NULL,"
    "PRIMARY KEY (`id`),"
    "INDEX mqtt_replay_pending_key(`key_hash`, `id`),"
    "INDEX mqtt_replay_pending_expires(`expires`)"
    ") ENGINE=InnoDB"
)
STATE_TABLES = (MARK_TABLE, TOMBSTONE_TABLE, PENDING_TABLE)
STATE_TABLES_DDL = (MARK_TABLE_DDL, TOMBSTONE_TABLE_DDL, PENDING_TABLE_DDL)
DEFAULT_SCHEMA_DDL = (MESSAGE_TABLE_DDL, SUBSCRIPTION_TABLE_DDL, *STATE_TABLES_DDL)

# Placeholders each statement can be given (the plugin renders the same maps).
_AVAILABLE: dict[str, frozenset[str]] = {
    "insert_message_sql": frozenset(
        {"id", "from", "clientid", "topic", "qos", "flags.retain", "retain", "payload", "timestamp"}
    ),
    "delete_message_sql": frozenset({"id", "topic"}),
    "select_message_sql": frozenset({"topic"}),
    "insert_subscription_sql": frozenset({"clientid", "topic", "qos"}),
    "select_subscriptions_sql": frozenset({"clientid"}),
    "delete_subscription_sql": frozenset({"clientid", "topic"}),
    "rekey_message_sql": frozenset({"id", "new_id", "topic"}),
}
_MESSAGE_COLUMNS_REQUIRED = ("id", "msgid", "topic", "payload")

# Errors after which the server has rolled the transaction back (or will) and an
# immediate retry is the right answer: deadlock, lock wait timeout.
_RETRY_CODES = frozenset({1213, 1205})
_RETRIES = 5
# Server errors meaning "reachable but unusable as configured".
_CONFIG_CODES = frozenset({1044, 1045, 1049, 1142, 1143, 1146, 1054, 1064, 1227, 1698, 3159})

_TEMPORAL_TYPES = frozenset({"datetime", "timestamp", "date"})
_NUMERIC_TYPES = frozenset(
    {"tinyint", "smallint", "mediumint", "int", "integer", "bigint", "decimal", "double", "float"}
)
_TEMPORAL_FIELD_TYPES = frozenset({7, 10, 12, 14, 17, 18})  # pymysql.constants.FIELD_TYPE
_NUMERIC_FIELD_TYPES = frozenset({0, 1, 2, 3, 4, 5, 8, 9, 246})
# Bytes PyMySQL escapes with a backslash (one extra byte each).
_ESCAPED_BYTES = tuple(bytes([b]) for b in b"\x00\n\r\\'\"\x1a")
_PACKET_MARGIN = 64 * 1024
_TOPICS_PER_QUERY = 100
# The exact topic, byte for byte: the default utf8mb4 collation is case-insensitive
# and pads spaces (`topic = 'a/b'` also matches 'A/B' and 'a/b '). The template's own
# `topic = ${topic}` still selects the index range; this only filters it.
_EXACT_TOPIC = "CAST(CONVERT(m.topic USING utf8mb4) AS BINARY) = %s"
_UNCERTAIN_MAX = 100_000


class _Retry(Exception):
    """A transaction the server rolled back (deadlock / lock wait timeout)."""


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def _error_code(exc: BaseException) -> int | None:
    if isinstance(exc, pymysql.err.Error) and exc.args and isinstance(exc.args[0], int):
        return int(exc.args[0])
    return None


def describe_error(exc: BaseException) -> str:
    """One line: the server's code and message, plus the TLS / socket cause that
    aiomysql hides behind "Can't connect". Never contains the password (neither
    the driver nor the server put it into messages)."""
    code = _error_code(exc)
    if code is not None:
        msg = exc.args[1] if len(exc.args) > 1 else ""
        text = f"[{code}] {msg}"
    else:
        text = f"{type(exc).__name__}: {exc}"
    seen: set[int] = {id(exc)}
    cause = exc.__cause__ or exc.__context__
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ssl.SSLCertVerificationError):
            text += f" (TLS: certificate verify failed: {cause.verify_message or cause.reason or cause})"
            break
        if isinstance(cause, ssl.SSLError):
            text += f" (TLS: {cause.reason or cause})"
            break
        if isinstance(cause, OSError):
            text += f" ({cause.strerror or cause})"
            break
        cause = cause.__cause__ or cause.__context__
    return joined(text)


_LOST_CODES = frozenset({2006, 2013, 2055})


def _connection_lost(exc: BaseException) -> bool:
    cause = exc.__cause__
    if cause is None:
        return False
    return _error_code(cause) in _LOST_CODES or isinstance(cause, (ConnectionError, BrokenPipeError))


def _sha(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


def _pending_key(topic: str, digest: str) -> bytes:
    return _sha(f"{topic}\0{digest}")


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def _escaped_size(value: object) -> int:
    """Bytes ``value`` takes in the statement PyMySQL sends (exact for bytes/str)."""
    if isinstance(value, (bytes, bytearray)):
        raw = bytes(value)
        return len(raw) + sum(raw.count(b) for b in _ESCAPED_BYTES) + 10
    if isinstance(value, str):
        raw = value.encode("utf-8", "surrogateescape")
        return len(raw) + sum(raw.count(b) for b in _ESCAPED_BYTES) + 2
    return 24


def _placeholders(count: int) -> str:
    return ", ".join(["%s"] * count)


@dataclass(slots=True)
class _Column:
    name: str
    data_type: str
    char_max: int | None
    octet_max: int | None
    collation: str | None
    auto_increment: bool

    def fits(self, value: str | bytes) -> bool:
        if isinstance(value, bytes):
            return self.octet_max is None or len(value) <= self.octet_max
        if self.data_type in ("varchar", "char") and self.char_max is not None:
            return len(value) <= self.char_max
        if self.octet_max is not None:
            return len(value.encode("utf-8", "surrogateescape")) <= self.octet_max
        return True

    def truncate(self, value: str) -> str:
        if self.data_type in ("varchar", "char") and self.char_max is not None:
            return value[: self.char_max]
        if self.octet_max is not None:
            return value.encode("utf-8", "surrogateescape")[: self.octet_max].decode("utf-8", "ignore")
        return value


@dataclass(slots=True)
class _TopicCursor:
    topic: str
    low: int | None
    high: int
    ids: deque[int] = field(default_factory=deque)
    exhausted: bool = False


class MysqlStore(Store):
    """``Store`` on MySQL / MariaDB; see the module docstring and docs/mysql-schema.md."""

    name = "mysql"

    def __init__(self, config: MysqlConfig, *, op_timeout_s: float = 30.0) -> None:
        self._cfg = config
        self._op_timeout = op_timeout_s
        self._pool: Any = None
        self._tls = config.ssl.enable
        self._ttl = max(0, int(config.message_ttl))
        try:
            self._t = {
                name: compile_template(f"mysql.{name}", sql) for name, sql in config.sql.items()
            }
            missing = [name for name in _AVAILABLE if name not in self._t]
            if missing:
                raise SqlTemplateError(f"mysql.{missing[0]}: template missing")
            for name, available in _AVAILABLE.items():
                self._t[name].require_only(available)
        except SqlTemplateError as exc:
            raise StoreConfigError(str(exc)) from None
        # multi-row batching needs a plain insert; the column mapping does not
        self._insert: PlainInsert | None = parse_plain_insert(self._t["insert_message_sql"])
        self._insert_shape: PlainInsert | None = parse_insert(self._t["insert_message_sql"])
        self._sub_insert: PlainInsert | None = parse_insert(self._t["insert_subscription_sql"])
        self._delete_by_id = parse_delete_by_id(self._t["delete_message_sql"])
        # filled in by open()
        self._db = config.database
        self._max_packet = 16 * 1024 * 1024
        self._msg_table = "`mqtt_msg`"
        self._msg_table_name = "mqtt_msg"
        self._topic_col = "topic"
        self._id_col: str | None = "id"
        self._msgid_col: str | None = "msgid"
        self._time_col: str | None = "arrived"
        self._time_kind = "temporal"
        self._topic_ci = True
        self._caps: dict[str, _Column] = {}  # placeholder -> column of the message table
        self._sub_caps: dict[str, _Column] = {}
        self._ts_expr = "0"
        self._read_ttl = ""
        self._uncertain: dict[str, None] = {}
        self._skipped_logged: set[str] = set()

    # ------------------------------------------------------------------ open/close
    async def open(self) -> None:
        if self._pool is not None:
            return
        cfg = self._cfg
        try:
            ssl_ctx = client_context(cfg.ssl, "mysql.ssl") if cfg.ssl.enable else None
        except TlsSetupError as exc:
            raise StoreConfigError(str(exc)) from None
        try:
            self._pool = await asyncio.wait_for(
                aiomysql.create_pool(
                    minsize=1,
                    maxsize=cfg.pool_size,
                    pool_recycle=3600,
                    host=cfg.server.host,
                    port=cfg.server.port,
                    user=cfg.username,
                    password=cfg.password,
                    db=cfg.database,
                    charset="utf8mb4",
                    autocommit=True,
                    ssl=ssl_ctx,
                    connect_timeout=10,
                    local_infile=False,
                    # Our transactions rely on next-key locks (claims, tombstones).
                    init_command="SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ",
                ),
                self._op_timeout,
            )
        except Exception as exc:
            raise self._open_error(exc) from None
        try:
            async with self._connection() as conn:
                async with conn.cursor() as cur:
                    if self._tls:
                        await cur.execute("SHOW SESSION STATUS LIKE 'Ssl_cipher'")
                        row = await cur.fetchone()
                        if not row or not row[1]:
                            raise StoreConfigError(
                                f"mysql.ssl.enable: the server at {cfg.server} did not accept TLS"
                            )
                    if cfg.init_default_schema:
                        # sql_notes = 0: no "table already exists" warnings
                        await cur.execute("SET SESSION sql_notes = 0")
                        for ddl in DEFAULT_SCHEMA_DDL:
                            await cur.execute(ddl)
                        await cur.execute("SET SESSION sql_notes = 1")
                    await self._inspect(cur)
        except StoreConfigError:
            await self.close()
            raise
        except StoreError as exc:
            await self.close()
            cause = exc.__cause__
            if cause is not None and _error_code(cause) in _CONFIG_CODES:
                raise StoreConfigError(str(exc)) from None
            raise
        except BaseException:
            await self.close()
            raise
        log.info(
            "mysql store open: %s database %s, pool %d%s", cfg.server, cfg.database, cfg.pool_size,
            ", TLS" if self._tls else "",
        )

    def _open_error(self, exc: BaseException) -> StoreError:
        code = _error_code(exc)
        text = describe_error(exc)
        where = f"mysql ({self._cfg.server}, database {self._cfg.database!r})"
        if code == 1049:
            return StoreConfigError(f"mysql.database: unknown database {self._cfg.database!r}")
        if code in (1045, 1698):
            return StoreConfigError(f"mysql.username / mysql.password: {text}")
        if code in _CONFIG_CODES:
            return StoreConfigError(f"{where}: {text}")
        if isinstance(exc, TimeoutError):
            return StoreError(f"{where}: no answer within {self._op_timeout:.0f} s")
        return StoreError(f"{where}: cannot connect: {text}")

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        pool.close()
        try:
            await asyncio.wait_for(pool.wait_closed(), 5)
        except Exception:
            pool.terminate()

    # ------------------------------------------------------------------ schema checks
    async def _inspect(self, cur: Any) -> None:
        await cur.execute("SELECT DATABASE(), @@max_allowed_packet")
        db, max_packet = await cur.fetchone()
        self._db = _text(db)
        self._max_packet = int(max_packet)

        if self._insert_shape is not None:
            msg_schema, msg_table = self._insert_shape.schema, self._insert_shape.table
        else:
            msg_schema, msg_table = first_table(self._t["insert_message_sql"]) or (None, "mqtt_msg")
        if self._sub_insert is not None:
            sub_schema, sub_table = self._sub_insert.schema, self._sub_insert.table
        else:
            sub_schema, sub_table = first_table(self._t["insert_subscription_sql"]) or (None, "mqtt_sub")
        msg_schema = msg_schema or self._db
        sub_schema = sub_schema or self._db
        wanted = [(msg_schema, msg_table), (sub_schema, sub_table)]
        wanted += [(self._db, table) for table in STATE_TABLES]
        missing = []
        for schema, table in wanted:
            await cur.execute(
                "SELECT 1 FROM information_schema.tables WHERE table_schema = %s AND table_name = %s",
                (schema, table),
            )
            if await cur.fetchone() is None:
                missing.append(f"`{schema}`.`{table}`")
        if missing:
            raise StoreConfigError(
                f"mysql: table {', '.join(missing)} does not exist (create it, DDL in "
                "docs/mysql-schema.md, or set mysql.init_default_schema = true)"
            )

        self._msg_table = f"{quote_ident(msg_schema)}.{quote_ident(msg_table)}"
        self._msg_table_name = f"{msg_schema}.{msg_table}"
        columns = await self._columns(cur, msg_schema, msg_table)
        direct = self._insert_shape.direct if self._insert_shape is not None else {}

        def column(name: str | None) -> _Column | None:
            return columns.get(name.lower()) if name else None

        topic = column(direct.get("topic") or "topic")
        if topic is None:
            raise StoreConfigError(
                f"mysql.insert_message_sql: cannot tell the topic column of {self._msg_table_name} "
                "(use a plain insert into t(..., topic_column, ...) values(..., ${topic}, ...))"
            )
        self._topic_col = topic.name
        coll = (topic.collation or "binary").lower()
        self._topic_ci = not (coll == "binary" or coll.endswith("_bin") or coll.endswith("_cs"))
        auto = [c for c in columns.values() if c.auto_increment]
        id_col = auto[0] if auto else column("id")
        self._id_col = id_col.name if id_col else None
        msgid = column(direct.get("id") or "msgid")
        self._msgid_col = msgid.name if msgid else None
        time_col = column((self._insert_shape.time_column if self._insert_shape else None) or "arrived")
        self._time_col = time_col.name if time_col else None
        if self._ttl > 0:
            if time_col is None or self._id_col is None:
                raise StoreConfigError(
                    f"mysql.message_ttl: table {self._msg_table_name} needs an arrival time column "
                    "(the insert_message_sql column filled from ${timestamp}) and an id column"
                )
            if time_col.data_type in _TEMPORAL_TYPES:
                self._time_kind = "temporal"
            elif time_col.data_type in _NUMERIC_TYPES:
                self._time_kind = "millis"
            else:
                raise StoreConfigError(
                    f"mysql.message_ttl: column {time_col.name} is {time_col.data_type}, "
                    "expected datetime/timestamp or milliseconds"
                )
        self._caps = {}
        for placeholder in ("topic", "payload", "from", "clientid", "id"):
            col = column(direct.get(placeholder))
            if col is not None:
                self._caps[placeholder] = col

        await cur.execute(
            "SELECT column_name FROM information_schema.statistics "
            "WHERE table_schema = %s AND table_name = %s AND seq_in_index = 1",
            (msg_schema, msg_table),
        )
        indexed = {_text(r[0]).lower() for r in await cur.fetchall()}
        if self._topic_col.lower() not in indexed:
            log.warning("mysql: %s.%s has no index: every replay read scans the table",
                        self._msg_table_name, self._topic_col)
        if self._msgid_col and self._msgid_col.lower() not in indexed:
            log.warning(
                "mysql: %s.%s has no index: every ack and re-key scans the table "
                "(CREATE INDEX msgid_index ON %s(%s))",
                self._msg_table_name, self._msgid_col, msg_table, self._msgid_col,
            )
        payload_col = self._caps.get("payload")
        if payload_col is not None and payload_col.octet_max is not None and payload_col.octet_max < 1 << 20:
            log.warning(
                "mysql: %s.%s holds at most %d bytes: larger messages are not stored "
                "(ALTER TABLE ... MODIFY %s longblob)",
                self._msg_table_name, payload_col.name, payload_col.octet_max, payload_col.name,
            )

        sub_columns = await self._columns(cur, sub_schema, sub_table)
        sub_direct = self._sub_insert.direct if self._sub_insert is not None else {}
        self._sub_caps = {}
        for placeholder in ("clientid", "topic"):
            name = sub_direct.get(placeholder)
            if name and name.lower() in sub_columns:
                self._sub_caps[placeholder] = sub_columns[name.lower()]

        await self._probe_templates(cur)

    async def _columns(self, cur: Any, schema: str, table: str) -> dict[str, _Column]:
        await cur.execute(
            "SELECT column_name, data_type, character_maximum_length, character_octet_length, "
            "collation_name, extra FROM information_schema.columns "
            "WHERE table_schema = %s AND table_name = %s",
            (schema, table),
        )
        out: dict[str, _Column] = {}
        for name, dtype, cmax, omax, coll, extra in await cur.fetchall():
            col = _Column(
                _text(name), _text(dtype).lower(),
                int(cmax) if cmax is not None else None,
                int(omax) if omax is not None else None,
                _text(coll) if coll is not None else None,
                "auto_increment" in _text(extra).lower(),
            )
            out[col.name.lower()] = col
        return out

    async def _probe_templates(self, cur: Any) -> None:
        """PREPARE every template (the server checks syntax, tables and columns
        without running it) and look at the columns the two SELECTs return."""
        for tmpl in self._t.values():
            try:
                await cur.execute("PREPARE ox_probe FROM %s", (tmpl.prepare_sql,))
                await cur.execute("DEALLOCATE PREPARE ox_probe")
            except pymysql.err.Error as exc:
                if _error_code(exc) is None or _error_code(exc) in (2006, 2013):
                    raise
                raise StoreConfigError(f"{tmpl.name}: {describe_error(exc)}") from None
        sel = self._t["select_message_sql"]
        description = await self._describe(cur, sel, sel.args({"topic": ""}))
        names = {d[0] for d in description}
        for required in _MESSAGE_COLUMNS_REQUIRED:
            if required not in names:
                raise StoreConfigError(
                    f"{sel.name}: the result has no column `{required}` (rows are read by column "
                    "name: msgid, sender, topic, qos, retain, payload, arrived, id)"
                )
        arrived_type = next((d[1] for d in description if d[0] == "arrived"), None)
        if arrived_type in _TEMPORAL_FIELD_TYPES:
            self._ts_expr = "FLOOR(UNIX_TIMESTAMP(m.arrived) * 1000)"
            self._read_ttl = " AND m.arrived >= NOW() - INTERVAL %s SECOND" if self._ttl else ""
        elif arrived_type in _NUMERIC_FIELD_TYPES:
            self._ts_expr = "m.arrived"
            self._read_ttl = " AND m.arrived >= (UNIX_TIMESTAMP() - %s) * 1000" if self._ttl else ""
        else:
            self._ts_expr = "0"
            if self._ttl:
                raise StoreConfigError(
                    f"{sel.name}: message_ttl needs an `arrived` column (datetime or milliseconds) "
                    "in the result"
                )
            self._read_ttl = ""
        subs = self._t["select_subscriptions_sql"]
        sub_names = {d[0] for d in await self._describe(cur, subs, subs.args({"clientid": ""}))}
        for required in ("topic", "qos"):
            if required not in sub_names:
                raise StoreConfigError(f"{subs.name}: the result has no column `{required}`")

    async def _describe(self, cur: Any, tmpl: SqlTemplate, args: tuple[object, ...]) -> Any:
        try:
            await cur.execute(f"SELECT * FROM ({tmpl.sql}) AS m LIMIT 0", args)
        except pymysql.err.Error as exc:
            if _error_code(exc) is None or _error_code(exc) in (2006, 2013):
                raise
            raise StoreConfigError(
                f"{tmpl.name}: must be a SELECT usable as a derived table: {describe_error(exc)}"
            ) from None
        await cur.fetchall()
        return cur.description or ()

    # ------------------------------------------------------------------ connections
    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        """A pooled connection for one operation, under ``op_timeout``. Any error
        closes the connection (it may be broken or mid-transaction: the server rolls
        an open transaction back when the connection goes) and becomes a StoreError
        (``_Retry`` for deadlocks / lock wait timeouts)."""
        pool = self._pool
        if pool is None:
            raise StoreError("mysql: store is not open")
        try:
            async with asyncio.timeout(self._op_timeout):
                conn = await pool.acquire()
                ok = False
                try:
                    if self._tls and not getattr(conn, "_secure", True):
                        # aiomysql goes on in clear text when the server offers no TLS
                        raise StoreConfigError(
                            f"mysql.ssl.enable: the server at {self._cfg.server} did not accept TLS"
                        )
                    yield conn
                    ok = True
                finally:
                    if not ok:
                        conn.close()
                    pool.release(conn)
        except (StoreError, _Retry, SqlTemplateError):
            raise
        except TimeoutError:
            raise StoreError(f"mysql: no answer within {self._op_timeout:.0f} s") from None
        except (pymysql.err.Error, OSError, ssl.SSLError, RuntimeError) as exc:
            if _error_code(exc) in _RETRY_CODES:
                raise _Retry(describe_error(exc)) from exc
            raise StoreError(f"mysql: {describe_error(exc)}") from exc

    async def _retrying(self, fn: Callable[[], Awaitable[_T]], lost: Callable[[], bool] | None = None) -> _T:
        """Run ``fn()`` (one operation / transaction) again at once after a deadlock
        or lock wait timeout (the server rolled it back), and once after a lost
        connection when ``lost()`` says a repeat is safe: a pooled connection can
        be dead without the pool knowing yet (e.g. just after a MariaDB restart)."""
        retried_lost = False
        for attempt in range(_RETRIES):
            try:
                return await fn()
            except _Retry as exc:
                if attempt == _RETRIES - 1:
                    raise StoreError(f"mysql: {exc}") from exc
                log.debug("mysql: %s, retrying the transaction", exc)
                await asyncio.sleep(0.005 * (attempt + 1))
            except StoreError as exc:
                if retried_lost or lost is None or not _connection_lost(exc) or not lost():
                    raise
                retried_lost = True
                log.info("%s; retrying once on a new connection", exc)
                # The idle connections most likely died with this one (server restart,
                # network cut): drop them rather than find out one failure at a time.
                self._drop_idle_connections()
        raise StoreError("mysql: too many deadlocks")

    def _drop_idle_connections(self) -> None:
        # aiomysql's Pool.clear() says goodbye on each connection and stops at the
        # first dead one; closing the transports is what we need.
        free = getattr(self._pool, "_free", None)
        while free:
            free.popleft().close()

    async def _read(self, fn: Callable[[], Awaitable[_T]]) -> _T:
        """A read-only (or idempotent) operation: repeat once on a lost connection."""
        return await self._retrying(fn, lambda: True)

    async def _query(
        self, sql: str, args: tuple[object, ...], *, dict_rows: bool = False, retry: bool = True
    ) -> list[Any]:
        """One statement (autocommit); ``retry``: it is safe to repeat."""

        async def once() -> list[Any]:
            cursor_class = aiomysql.DictCursor if dict_rows else aiomysql.Cursor
            async with self._connection() as conn, conn.cursor(cursor_class) as cur:
                await cur.execute(sql, args)
                return list(await cur.fetchall())

        return await self._retrying(once, (lambda: True) if retry else None)

    async def ping(self) -> None:
        await self._query("SELECT 1", ())

    # ------------------------------------------------------------------ write path
    async def write(self, ops: Sequence[WriteOp]) -> None:
        if not ops:
            return

        async def once() -> None:
            try:
                await self._write_once(ops)
            except _Retry:
                raise  # rolled back for sure
            except BaseException:
                # The commit may or may not have happened: remember these saves so
                # that a repeat of this batch (ours below, or the caller's) checks
                # for them before inserting again.
                self._note_uncertain(ops)
                raise

        await self._retrying(once, lambda: True)
        if self._uncertain:
            for op in ops:
                if isinstance(op, SaveMessage):
                    self._uncertain.pop(op.message.msgid, None)

    def _note_uncertain(self, ops: Sequence[WriteOp]) -> None:
        for op in ops:
            if isinstance(op, SaveMessage):
                self._uncertain[op.message.msgid] = None
        while len(self._uncertain) > _UNCERTAIN_MAX:
            self._uncertain.pop(next(iter(self._uncertain)))

    async def _write_once(self, ops: Sequence[WriteOp]) -> None:
        async with self._connection() as conn, conn.cursor() as cur:
            await conn.begin()
            i = 0
            while i < len(ops):
                op = ops[i]
                j = i + 1
                if isinstance(op, SaveMessage):
                    while j < len(ops) and isinstance(ops[j], SaveMessage):
                        j += 1
                    await self._save_many(cur, [o.message for o in ops[i:j] if isinstance(o, SaveMessage)])
                elif isinstance(op, DeleteMessage):
                    while j < len(ops) and isinstance(ops[j], DeleteMessage):
                        j += 1
                    await self._delete_many(cur, [o for o in ops[i:j] if isinstance(o, DeleteMessage)])
                elif isinstance(op, RekeyMessage):
                    await self._rekey(cur, op)
                else:  # pragma: no cover - the WriteOp union is closed
                    raise TypeError(f"unknown write op {op!r}")
                i = j
            await conn.commit()

    def _fit(self, msg: StoredMessage) -> StoredMessage | None:
        """The message as it can be stored, or None (logged) when a column or the
        packet limit cannot hold it. Storing a cut topic or payload would replay
        garbage, and a row the server rejects would fail the batch forever."""
        problem = None
        topic_col = self._caps.get("topic")
        payload_col = self._caps.get("payload")
        if topic_col is not None and not topic_col.fits(msg.topic):
            problem = f"the topic is longer than column {topic_col.name} allows"
        elif payload_col is not None and not payload_col.fits(bytes(msg.payload)):
            problem = f"the payload ({len(msg.payload)} bytes) exceeds column {payload_col.name}"
        elif _escaped_size(bytes(msg.payload)) + 4096 > self._max_packet - _PACKET_MARGIN:
            problem = f"the payload ({len(msg.payload)} bytes) exceeds the server's max_allowed_packet"
        if problem is not None:
            if msg.msgid not in self._skipped_logged:
                if len(self._skipped_logged) > 10_000:
                    self._skipped_logged.clear()
                self._skipped_logged.add(msg.msgid)
                log.error("mysql: message %s on topic %.200r not stored: %s", msg.msgid, msg.topic, problem)
            return None
        sender_col = self._caps.get("from") or self._caps.get("clientid")
        if sender_col is not None and not sender_col.fits(msg.sender):
            msg = replace(msg, sender=sender_col.truncate(msg.sender))
        return msg

    async def _save_many(self, cur: Any, messages: list[StoredMessage]) -> None:
        batch: list[StoredMessage] = []
        seen: set[str] = set()
        for raw in messages:
            msg = self._fit(raw)
            if msg is None or msg.msgid in seen:
                continue
            seen.add(msg.msgid)
            batch.append(msg)
        retried = [m.msgid for m in batch if m.msgid in self._uncertain]
        if retried and self._msgid_col is not None:
            col = quote_ident(self._msgid_col)
            await cur.execute(
                f"SELECT {col} FROM {self._msg_table} WHERE {col} IN ({_placeholders(len(retried))})",
                tuple(retried),
            )
            present = {_text(r[0]) for r in await cur.fetchall()}
            batch = [m for m in batch if m.msgid not in present]
        if not batch:
            return
        if self._insert is None:
            tmpl = self._t["insert_message_sql"]
            await cur.executemany(tmpl.sql, [tmpl.args(message_values(m)) for m in batch])
            return
        row_args = [self._insert.row.args(message_values(m)) for m in batch]
        limit = self._max_packet - _PACKET_MARGIN
        head = len(self._insert.head.sql) + 16
        chunk: list[tuple[object, ...]] = []
        size = head
        for args in row_args:
            row_size = len(self._insert.row.sql) + 2 + sum(_escaped_size(a) for a in args)
            if chunk and size + row_size > limit:
                await self._insert_rows(cur, chunk)
                chunk, size = [], head
            chunk.append(args)
            size += row_size
        if chunk:
            await self._insert_rows(cur, chunk)

    async def _insert_rows(self, cur: Any, rows: list[tuple[object, ...]]) -> None:
        assert self._insert is not None
        flat: list[object] = []
        for args in rows:
            flat.extend(args)
        await cur.execute(self._insert.multi_row(len(rows)), tuple(flat))

    async def _delete_many(self, cur: Any, ops: list[DeleteMessage]) -> None:
        tombstones = [op.msgid for op in ops if op.replay_ack]
        if tombstones:
            # The tombstone goes in BEFORE the delete (same transaction): a re-key
            # of this id that is not written yet will find it and delete its row.
            values = ", ".join(["(%s, UNIX_TIMESTAMP() + %s)"] * len(tombstones))
            args: list[object] = []
            for msgid in tombstones:
                args += [msgid, TOMBSTONE_TTL_S]
            await cur.execute(
                f"INSERT INTO {TOMBSTONE_TABLE} (msgid, expires) VALUES {values} "
                "ON DUPLICATE KEY UPDATE expires = VALUES(expires)",
                tuple(args),
            )
        if self._delete_by_id is not None and len(ops) > 1:
            # the default "delete from t where msgid = ${id}": one statement for all
            table, column = self._delete_by_id
            msgids = list(dict.fromkeys(op.msgid for op in ops))
            for start in range(0, len(msgids), 1000):
                chunk = msgids[start : start + 1000]
                await cur.execute(
                    f"DELETE FROM {table} WHERE {column} IN ({_placeholders(len(chunk))})", tuple(chunk)
                )
            return
        tmpl = self._t["delete_message_sql"]
        await cur.executemany(tmpl.sql, [tmpl.args({"id": op.msgid, "topic": op.topic}) for op in ops])

    async def _rekey(self, cur: Any, op: RekeyMessage) -> None:
        # Lock the tombstone key first (record lock if present, gap lock if not):
        # a concurrent replay ack on another instance either committed its tombstone
        # before (we see it and delete) or waits until we commit (its delete then
        # finds the row under the new id).
        await cur.execute(
            f"SELECT expires >= UNIX_TIMESTAMP() FROM {TOMBSTONE_TABLE} WHERE msgid = %s FOR UPDATE",
            (op.new_id,),
        )
        row = await cur.fetchone()
        acked = bool(row and row[0])
        rekey = self._t["rekey_message_sql"]
        await cur.execute(rekey.sql, rekey.args({"id": op.old_id, "new_id": op.new_id, "topic": op.topic}))
        if acked:
            delete = self._t["delete_message_sql"]
            await cur.execute(delete.sql, delete.args({"id": op.new_id, "topic": op.topic}))

    # ------------------------------------------------------------------ subscriptions
    def _check_sub(self, clientid: str, topic: str) -> None:
        for placeholder, value in (("clientid", clientid), ("topic", topic)):
            col = self._sub_caps.get(placeholder)
            if col is not None and not col.fits(value):
                # not retryable: the column is too small for this value
                raise StoreConfigError(
                    f"mysql: subscription {placeholder} ({len(value)} characters) is longer than "
                    f"column {col.name} allows"
                )

    async def save_subscription(self, clientid: str, topic: str, qos: int) -> None:
        self._check_sub(clientid, topic)
        tmpl = self._t["insert_subscription_sql"]
        await self._query(tmpl.sql, tmpl.args(subscription_values(clientid, topic, qos)))

    async def delete_subscription(self, clientid: str, topic: str) -> None:
        tmpl = self._t["delete_subscription_sql"]
        await self._query(tmpl.sql, tmpl.args(subscription_values(clientid, topic)))

    async def subscriptions(self, clientid: str) -> list[Subscription]:
        tmpl = self._t["select_subscriptions_sql"]
        rows = await self._query(tmpl.sql, tmpl.args(subscription_values(clientid)), dict_rows=True)
        out = []
        for row in rows:
            if row.get("topic") is None or row.get("qos") is None:
                continue  # the plugin skips incomplete records too
            out.append(Subscription(_text(row["topic"]), int(row["qos"])))
        return out

    # ------------------------------------------------------------------ replay reads
    async def stored_topics(self, pattern_prefix: str) -> list[str]:
        col = quote_ident(self._topic_col)
        # A case-insensitive collation would fold "A/b" and "a/b" into one DISTINCT
        # value: compare bytes then (cost: the matching index entries, not the rows).
        expr = f"CAST(CONVERT({col} USING utf8mb4) AS BINARY)" if self._topic_ci else col
        sql = f"SELECT DISTINCT {expr} FROM {self._msg_table}"
        args: tuple[object, ...] = ()
        if pattern_prefix:
            escaped = pattern_prefix.replace("!", "!!").replace("%", "!%").replace("_", "!_")
            sql += f" WHERE {col} LIKE %s ESCAPE '!'"
            args = (escaped + "%",)
        rows = await self._query(sql, args)
        topics = set()
        for (value,) in rows:
            topic = _text(value)
            if topic.startswith(pattern_prefix):
                topics.add(topic)
        return sorted(topics)

    def _select(self, topic: str) -> tuple[str, tuple[object, ...]]:
        sel = self._t["select_message_sql"]
        return sel.sql, sel.args({"topic": topic})

    async def _per_topic(self, topics: Sequence[str], select: str, where: str, where_args: list[object]
                         ) -> list[tuple[str, Any]]:
        """One ``select`` per topic over ``select_message_sql`` (as the replay reads: the
        same rows, on the topic index), UNION ALL'ed in chunks; (topic, value) rows."""
        unique = list(dict.fromkeys(topics))
        rows: list[tuple[str, Any]] = []
        for start in range(0, len(unique), _TOPICS_PER_QUERY):
            chunk = unique[start : start + _TOPICS_PER_QUERY]
            parts = []
            args: list[object] = []
            for i, topic in enumerate(chunk):
                sel_sql, sel_args = self._select(topic)
                parts.append(f"(SELECT {i} AS ox_i, {select} FROM ({sel_sql}) AS m WHERE {_EXACT_TOPIC}{where})")
                args += [*sel_args, topic.encode("utf-8", "surrogatepass"), *where_args]
            rows += [(chunk[int(i)], value) for i, value in await self._query(" UNION ALL ".join(parts), tuple(args))]
        return rows

    async def latest_positions(self, topics: Sequence[str]) -> dict[str, float]:
        rows = await self._per_topic(topics, "m.id AS ox_id", " ORDER BY m.id DESC LIMIT 1", [])
        return {topic: float(pos) for topic, pos in rows}

    async def count_messages(self, topics: Sequence[str]) -> dict[str, int]:
        rows = await self._per_topic(topics, "COUNT(*) AS ox_n", self._read_ttl, self._ttl_args())
        return {topic: int(n) for topic, n in rows if n}

    async def read_messages(
        self, ranges: dict[str, tuple[float | None, float]], page_size: int
    ) -> AsyncIterator[list[StoredMessage]]:
        """Two phases: merge ids (cheap, index-only) across topics, then fetch the
        rows of one page by id. Memory stays at one page of payloads plus a few
        hundred ids per topic, whatever the number of topics."""
        page_size = max(1, int(page_size))
        cursors: dict[str, _TopicCursor] = {}
        for topic, (low, high) in ranges.items():
            lo = None if low is None else math.floor(low)
            hi = math.floor(high)
            if lo is not None and lo >= hi:
                continue
            cursors[topic] = _TopicCursor(topic, lo, hi)
        if not cursors:
            return
        fetch = min(max(page_size, 100), 1000)
        await self._refill(list(cursors.values()), fetch)
        heap = [(c.ids[0], c.topic) for c in cursors.values() if c.ids]
        heapq.heapify(heap)
        seen: set[str] = set()
        pending: list[tuple[int, str]] = []
        while heap:
            pos, topic = heapq.heappop(heap)
            cursor = cursors[topic]
            cursor.ids.popleft()
            pending.append((pos, topic))
            if not cursor.ids and not cursor.exhausted:
                await self._refill([cursor], fetch)
            if cursor.ids:
                heapq.heappush(heap, (cursor.ids[0], topic))
            if len(pending) >= page_size:
                page = await self._fetch_rows(pending, seen)
                pending = []
                if page:
                    yield page
        if pending:
            page = await self._fetch_rows(pending, seen)
            if page:
                yield page

    def _ttl_args(self) -> list[object]:
        return [self._ttl] if self._read_ttl else []

    async def _refill(self, cursors: list[_TopicCursor], fetch: int) -> None:
        for start in range(0, len(cursors), _TOPICS_PER_QUERY):
            chunk = cursors[start : start + _TOPICS_PER_QUERY]
            parts = []
            args: list[object] = []
            for i, c in enumerate(chunk):
                sel_sql, sel_args = self._select(c.topic)
                low = "" if c.low is None else " AND m.id > %s"
                parts.append(
                    f"(SELECT {i} AS ox_i, m.id AS ox_id FROM ({sel_sql}) AS m "
                    f"WHERE {_EXACT_TOPIC} AND m.id <= %s{low}{self._read_ttl} "
                    f"ORDER BY m.id LIMIT {int(fetch)})"
                )
                args += [*sel_args, c.topic.encode("utf-8", "surrogatepass"), c.high]
                if c.low is not None:
                    args.append(c.low)
                args += self._ttl_args()
            rows = await self._query(" UNION ALL ".join(parts), tuple(args))
            got: dict[int, list[int]] = {}
            for i, pos in rows:
                got.setdefault(int(i), []).append(int(pos))
            for i, c in enumerate(chunk):
                ids = sorted(got.get(i, []))
                c.ids.extend(ids)
                if ids:
                    c.low = ids[-1]
                c.exhausted = len(ids) < fetch

    async def _fetch_rows(self, page: list[tuple[int, str]], seen: set[str]) -> list[StoredMessage]:
        by_topic: dict[str, list[int]] = {}
        for pos, topic in page:
            by_topic.setdefault(topic, []).append(pos)
        items = list(by_topic.items())
        rows: list[dict[str, Any]] = []
        for start in range(0, len(items), _TOPICS_PER_QUERY):
            parts = []
            args: list[object] = []
            for topic, ids in items[start : start + _TOPICS_PER_QUERY]:
                sel_sql, sel_args = self._select(topic)
                parts.append(
                    f"(SELECT m.*, {self._ts_expr} AS ox_ts FROM ({sel_sql}) AS m "
                    f"WHERE {_EXACT_TOPIC} AND m.id IN ({_placeholders(len(ids))})"
                    f"{self._read_ttl})"
                )
                args += [*sel_args, topic.encode("utf-8", "surrogatepass"), *ids, *self._ttl_args()]
            rows.extend(await self._query(" UNION ALL ".join(parts), tuple(args), dict_rows=True))
        messages = sorted((self._to_message(r) for r in rows), key=lambda m: m.position)
        out = []
        for msg in messages:
            # A retried batch can (rarely) have stored a message twice: same msgid,
            # two positions. The ack deletes both rows (by msgid); replay one.
            if msg.msgid in seen:
                continue
            seen.add(msg.msgid)
            out.append(msg)
        return out

    @staticmethod
    def _to_message(row: dict[str, Any]) -> StoredMessage:
        payload = row.get("payload")
        if payload is None:
            data = b""
        elif isinstance(payload, str):
            data = payload.encode("utf-8", "surrogateescape")
        else:
            data = bytes(payload)
        retain = row.get("retain")
        return StoredMessage(
            msgid=_text(row.get("msgid")),
            sender=_text(row.get("sender")),
            topic=_text(row.get("topic")),
            qos=int(row.get("qos") or 0),
            retain=bool(int(retain)) if retain is not None else False,
            payload=data,
            timestamp=int(row.get("ox_ts") or 0),
            position=float(row["id"]),
        )

    # ------------------------------------------------------------------ bookkeeping
    async def claim_replay(self, connection: str, highs: dict[str, float]) -> dict[str, float | None]:
        if not highs:
            return {}
        conn_key = _sha(connection)
        # Sorted keys: every claim locks rows in the same order (no lock cycles).
        items = sorted((_sha(topic), topic, float(high)) for topic, high in highs.items())
        committing = False

        async def attempt() -> dict[bytes, float | None]:
            nonlocal committing
            async with self._connection() as conn, conn.cursor() as cur:
                await conn.begin()
                # 1. Create missing marks / forget expired ones. INSERT ... ON DUPLICATE
                #    KEY UPDATE takes exclusive locks on new and existing rows alike, so
                #    two first claims queue up instead of deadlocking (INSERT IGNORE
                #    would take shared locks and deadlock on the upgrade).
                values = ", ".join(["(%s, %s, NULL, UNIX_TIMESTAMP() + %s)"] * len(items))
                args: list[object] = []
                for topic_key, _, _ in items:
                    args += [conn_key, topic_key, REPLAY_MARK_TTL_S]
                await cur.execute(
                    f"INSERT INTO {MARK_TABLE} (conn_hash, topic_hash, position, expires) VALUES {values} "
                    "ON DUPLICATE KEY UPDATE position = IF(expires < UNIX_TIMESTAMP(), NULL, position), "
                    "expires = VALUES(expires)",
                    tuple(args),
                )
                # 2. The previous marks (rows are locked by us now).
                await cur.execute(
                    f"SELECT topic_hash, position FROM {MARK_TABLE} WHERE conn_hash = %s "
                    f"AND topic_hash IN ({_placeholders(len(items))}) FOR UPDATE",
                    (conn_key, *[key for key, _, _ in items]),
                )
                previous: dict[bytes, float | None] = {
                    bytes(key): (float(pos) if pos is not None else None) for key, pos in await cur.fetchall()
                }
                # 3. Raise them.
                values = ", ".join(["(%s, %s, %s, UNIX_TIMESTAMP() + %s)"] * len(items))
                args = []
                for topic_key, _, high in items:
                    args += [conn_key, topic_key, high, REPLAY_MARK_TTL_S]
                await cur.execute(
                    f"INSERT INTO {MARK_TABLE} (conn_hash, topic_hash, position, expires) VALUES {values} "
                    "ON DUPLICATE KEY UPDATE position = "
                    "IF(position IS NULL OR position < VALUES(position), VALUES(position), position)",
                    tuple(args),
                )
                committing = True
                await conn.commit()
                return previous

        # A claim is not idempotent (a repeat would see its own marks): repeat after
        # a lost connection only if the commit was not sent yet.
        previous = await self._retrying(attempt, lambda: not committing)
        return {topic: previous.get(key) for key, topic, _ in items}

    async def reset_replay_marks(self, connection: str) -> None:
        await self._query(f"DELETE FROM {MARK_TABLE} WHERE conn_hash = %s", (_sha(connection),))

    async def register_pending_replays(self, items: Sequence[PendingReplay]) -> None:
        if not items:
            return
        # One statement per chunk: auto-increment ids follow the list order, and
        # take_pending_replay pops the lowest id first (FIFO per topic and digest).
        rows: list[object] = []
        for item in items:
            rows += [_pending_key(item.topic, item.digest), item.msgid, PENDING_REPLAY_TTL_S]
        # Not repeated after a lost connection: a second copy of an entry could later
        # claim an unrelated publish with the same topic and payload.
        for start in range(0, len(items), 500):
            chunk = rows[start * 3 : (start + 500) * 3]
            values = ", ".join(["(%s, %s, UNIX_TIMESTAMP() + %s)"] * (len(chunk) // 3))
            await self._query(
                f"INSERT INTO {PENDING_TABLE} (key_hash, msgid, expires) VALUES {values}", tuple(chunk),
                retry=False,
            )

    async def take_pending_replay(self, topic: str, digest: str) -> str | None:
        key = _pending_key(topic, digest)
        committing = False

        async def attempt() -> str | None:
            nonlocal committing
            async with self._connection() as conn, conn.cursor() as cur:
                await conn.begin()
                await cur.execute(
                    f"SELECT id, msgid FROM {PENDING_TABLE} WHERE key_hash = %s "
                    "AND expires >= UNIX_TIMESTAMP() ORDER BY id LIMIT 1 FOR UPDATE",
                    (key,),
                )
                row = await cur.fetchone()
                if row is None:
                    await conn.commit()
                    return None
                await cur.execute(f"DELETE FROM {PENDING_TABLE} WHERE id = %s", (row[0],))
                committing = True
                await conn.commit()
                return _text(row[1])

        return await self._retrying(attempt, lambda: not committing)

    async def purge_expired(self, limit: int) -> int:
        limit = max(1, int(limit))
        return await self._read(lambda: self._purge_once(limit))

    async def _purge_once(self, limit: int) -> int:
        deleted = 0
        async with self._connection() as conn, conn.cursor() as cur:
            if self._ttl > 0 and self._id_col and self._time_col:
                id_col, time_col = quote_ident(self._id_col), quote_ident(self._time_col)
                if self._time_kind == "temporal":
                    expired = "{} < NOW() - INTERVAL %s SECOND"
                else:
                    expired = "{} < (UNIX_TIMESTAMP() - %s) * 1000"
                cutoff = expired.format(time_col)
                # Look at the `limit` oldest rows only (primary key order = arrival
                # order), without locks; delete the expired ones among them by id.
                # Cost is bounded by `limit` whatever the table size.
                await cur.execute(
                    f"SELECT o.id FROM (SELECT {id_col} AS id, {time_col} AS t FROM {self._msg_table} "
                    f"ORDER BY {id_col} LIMIT %s) AS o WHERE {expired.format('o.t')}",
                    (limit, self._ttl),
                )
                ids = [r[0] for r in await cur.fetchall()]
                if ids:
                    await cur.execute(
                        f"DELETE FROM {self._msg_table} WHERE {id_col} IN ({_placeholders(len(ids))}) "
                        f"AND {cutoff}",
                        (*ids, self._ttl),
                    )
                    deleted = int(cur.rowcount)
            for table in STATE_TABLES:
                await cur.execute(
                    f"DELETE FROM {table} WHERE expires < UNIX_TIMESTAMP() LIMIT %s", (limit,)
                )
        return deleted
