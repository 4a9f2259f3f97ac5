"""What ``open()`` learns about the server and the operator's tables, as ONE frozen
value: which table and columns the templates address, what each column can hold,
how replay reads get a message's time, and what the server limits are.

Everything here is read with the connection ``open()`` holds; nothing changes it
afterwards (a schema changed under a running service shows up as a
``StoreConfigError`` at write time, see ``errors.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import pymysql

from storage.base import StoreConfigError
from storage.mysql.columns import NUMERIC_TYPES, TEMPORAL_TYPES, Column, text
from storage.mysql.ddl import STATE_TABLES
from storage.mysql.errors import LOST_CODES, describe_error, error_code
from storage.mysql.sql_template import SqlTemplate, quote_ident
from storage.mysql.templates import Templates

log = logging.getLogger(__name__)

_MESSAGE_COLUMNS_REQUIRED = ("id", "msgid", "topic", "payload")
_TEMPORAL_FIELD_TYPES = frozenset({7, 10, 12, 14, 17, 18})  # pymysql.constants.FIELD_TYPE
_NUMERIC_FIELD_TYPES = frozenset({0, 1, 2, 3, 4, 5, 8, 9, 246})
# FROM_UNIXTIME's upper bound differs by server: 2038 (MariaDB < 11.5, MySQL < 8.0.28),
# 2106 (MariaDB 11.5+), year 3001 (MySQL 8.0.28+); beyond it the function returns NULL
# and the insert fails. Asked once at open (largest candidate the server accepts).
_UNIXTIME_CANDIDATES = (32536771199, 4294967295, 2147483647)


@dataclass(frozen=True, slots=True)
class MessageColumns:
    """The message table as the templates use it."""

    table: str  # quoted `schema`.`table`
    name: str  # schema.table, for messages
    topic: str
    topic_ci: bool  # a case-insensitive collation: compare topics as bytes
    id: str | None  # the position (AUTO_INCREMENT) column
    msgid: str | None
    time: str | None
    time_kind: str  # "temporal" (DATETIME/TIMESTAMP) or "millis" (integer)
    # placeholder -> the column it fills as a bare ${placeholder} (the values the
    # store can check before a write)
    fills: Mapping[str, Column]
    # the milliseconds insert_message_sql can store, when the store can tell
    timestamps: tuple[int, int] | None


@dataclass(frozen=True, slots=True)
class Schema:
    database: str
    max_packet: int  # @@max_allowed_packet
    messages: MessageColumns
    subscription_fills: Mapping[str, Column]  # placeholder -> column of insert_subscription_sql
    ts_expr: str  # the SQL expression of a read row's timestamp (ms)
    read_ttl: str  # the SQL condition hiding expired rows ('' without message_ttl)


async def inspect(cur: Any, templates: Templates, ttl: int) -> Schema:
    """Read the schema; raise ``StoreConfigError`` naming what is missing or wrong."""
    await cur.execute("SELECT DATABASE(), @@max_allowed_packet")
    db_value, max_packet = await cur.fetchone()
    database = text(db_value)
    msg_schema, msg_table = templates.message_table()
    sub_schema, sub_table = templates.subscription_table()
    msg_schema, sub_schema = msg_schema or database, sub_schema or database
    await _require_tables(cur, [(msg_schema, msg_table), (sub_schema, sub_table),
                                *((database, table) for table in STATE_TABLES)])
    messages = await _message_columns(cur, templates, msg_schema, msg_table, ttl)
    await _advise_indexes(cur, msg_schema, msg_table, messages)
    sub_columns = await _columns(cur, sub_schema, sub_table)
    sub_direct = templates.subscription_shape.direct if templates.subscription_shape is not None else {}
    sub_fills = {p: sub_columns[c.lower()] for p, c in sub_direct.items() if c.lower() in sub_columns}
    await _prepare_all(cur, templates)
    ts_expr, read_ttl = await _read_time(cur, templates.select_message, ttl)
    await _check_subscription_select(cur, templates.select_subscriptions)
    return Schema(database, int(max_packet), messages, MappingProxyType(sub_fills), ts_expr, read_ttl)


async def _require_tables(cur: Any, wanted: list[tuple[str, str]]) -> None:
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


async def _columns(cur: Any, schema: str, table: str) -> dict[str, Column]:
    await cur.execute(
        "SELECT column_name, data_type, column_type, character_maximum_length, character_octet_length, "
        "collation_name, extra FROM information_schema.columns WHERE table_schema = %s AND table_name = %s",
        (schema, table),
    )
    columns = [Column.from_row(tuple(row)) for row in await cur.fetchall()]
    return {c.name.lower(): c for c in columns}


async def _message_columns(cur: Any, templates: Templates, schema: str, table: str, ttl: int) -> MessageColumns:
    columns = await _columns(cur, schema, table)
    shape = templates.insert_shape
    direct = shape.direct if shape is not None else {}

    def column(name: str | None) -> Column | None:
        return columns.get(name.lower()) if name else None

    name = f"{schema}.{table}"
    topic = column(direct.get("topic") or "topic")
    if topic is None:
        raise StoreConfigError(
            f"mysql.insert_message_sql: cannot tell the topic column of {name} "
            "(use a plain insert into t(..., topic_column, ...) values(..., ${topic}, ...))"
        )
    auto = [c for c in columns.values() if c.auto_increment]
    id_col = auto[0] if auto else column("id")
    msgid = column(direct.get("id") or "msgid")
    time_col = column((shape.time_column if shape else None) or "arrived")
    time_kind = _time_kind(time_col, id_col, name) if ttl > 0 else "temporal"
    fills = {p: c for p, c in ((p, column(c)) for p, c in direct.items()) if c is not None}
    timestamps = None
    if shape is not None and shape.time_column is not None and time_col is not None:
        timestamps = await _timestamp_range(cur, templates.insert_message, time_col, direct)
    return MessageColumns(
        f"{quote_ident(schema)}.{quote_ident(table)}", name, topic.name, topic.case_insensitive,
        id_col.name if id_col else None, msgid.name if msgid else None, time_col.name if time_col else None,
        time_kind, MappingProxyType(fills), timestamps,
    )


def _time_kind(time_col: Column | None, id_col: Column | None, table: str) -> str:
    """How message_ttl compares the arrival time column."""
    if time_col is None or id_col is None:
        raise StoreConfigError(
            f"mysql.message_ttl: table {table} needs an arrival time column "
            "(the insert_message_sql column filled from ${timestamp}) and an id column"
        )
    if time_col.data_type in TEMPORAL_TYPES:
        return "temporal"
    if time_col.data_type in NUMERIC_TYPES:
        return "millis"
    raise StoreConfigError(
        f"mysql.message_ttl: column {time_col.name} is {time_col.data_type}, "
        "expected datetime/timestamp or milliseconds"
    )


async def _timestamp_range(
    cur: Any, insert: SqlTemplate, time_col: Column, direct: Mapping[str, str]
) -> tuple[int, int] | None:
    """The ``${timestamp}`` values (ms) the time column takes, where the store can
    tell: an integer column filled with the bare value, or a DATETIME/TIMESTAMP
    filled through FROM_UNIXTIME (the plugin's ``FROM_UNIXTIME(${timestamp}/1000)``)."""
    if direct.get("timestamp", "").lower() == time_col.name.lower():
        return time_col.int_range()
    if time_col.data_type in TEMPORAL_TYPES and "from_unixtime" in insert.source.lower():
        # max_error_count = 0: the server keeps no warning text for the candidates it
        # refuses, so the driver has none to turn into Python warnings
        await cur.execute("SET SESSION max_error_count = 0")
        await cur.execute(
            "SELECT " + ", ".join("FROM_UNIXTIME(%s) IS NOT NULL" for _ in _UNIXTIME_CANDIDATES),
            _UNIXTIME_CANDIDATES,
        )
        accepted = await cur.fetchone()
        await cur.execute("SET SESSION max_error_count = DEFAULT")
        seconds = next((c for c, ok in zip(_UNIXTIME_CANDIDATES, accepted, strict=True) if ok), 2147483647)
        return 0, seconds * 1000 + 999
    return None


async def _advise_indexes(cur: Any, schema: str, table: str, messages: MessageColumns) -> None:
    await cur.execute(
        "SELECT column_name FROM information_schema.statistics "
        "WHERE table_schema = %s AND table_name = %s AND seq_in_index = 1",
        (schema, table),
    )
    indexed = {text(r[0]).lower() for r in await cur.fetchall()}
    if messages.topic.lower() not in indexed:
        log.warning("mysql: %s.%s has no index: every replay read scans the table", messages.name, messages.topic)
    if messages.msgid and messages.msgid.lower() not in indexed:
        log.warning(
            "mysql: %s.%s has no index: every ack and re-key scans the table (CREATE INDEX msgid_index ON %s(%s))",
            messages.name, messages.msgid, table, messages.msgid,
        )
    payload = messages.fills.get("payload")
    if payload is not None and payload.octet_max is not None and payload.octet_max < 1 << 20:
        log.warning(
            "mysql: %s.%s holds at most %d bytes: larger messages are refused (ALTER TABLE ... MODIFY %s longblob)",
            messages.name, payload.name, payload.octet_max, payload.name,
        )


async def _prepare_all(cur: Any, templates: Templates) -> None:
    """PREPARE every template: the server checks syntax, tables and columns without
    running it."""
    for tmpl in templates.all():
        try:
            await cur.execute("PREPARE ox_probe FROM %s", (tmpl.prepare_sql,))
            await cur.execute("DEALLOCATE PREPARE ox_probe")
        except pymysql.err.Error as exc:
            if error_code(exc) is None or error_code(exc) in LOST_CODES:
                raise
            raise StoreConfigError(f"{tmpl.name}: {describe_error(exc)}") from None


async def _read_time(cur: Any, select: SqlTemplate, ttl: int) -> tuple[str, str]:
    """The columns select_message_sql returns; the expression of a row's timestamp in
    ms and the condition that hides expired rows."""
    description = await _describe(cur, select, select.args({"topic": ""}))
    names = {d[0] for d in description}
    for required in _MESSAGE_COLUMNS_REQUIRED:
        if required not in names:
            raise StoreConfigError(
                f"{select.name}: the result has no column `{required}` (rows are read by column "
                "name: msgid, sender, topic, qos, retain, payload, arrived, id)"
            )
    arrived_type = next((d[1] for d in description if d[0] == "arrived"), None)
    if arrived_type in _TEMPORAL_FIELD_TYPES:
        return "FLOOR(UNIX_TIMESTAMP(m.arrived) * 1000)", " AND m.arrived >= NOW() - INTERVAL %s SECOND" if ttl else ""
    if arrived_type in _NUMERIC_FIELD_TYPES:
        return "m.arrived", " AND m.arrived >= (UNIX_TIMESTAMP() - %s) * 1000" if ttl else ""
    if ttl:
        raise StoreConfigError(
            f"{select.name}: message_ttl needs an `arrived` column (datetime or milliseconds) in the result"
        )
    return "0", ""


async def _check_subscription_select(cur: Any, select: SqlTemplate) -> None:
    names = {d[0] for d in await _describe(cur, select, select.args({"clientid": ""}))}
    for required in ("topic", "qos"):
        if required not in names:
            raise StoreConfigError(f"{select.name}: the result has no column `{required}`")


async def _describe(cur: Any, tmpl: SqlTemplate, args: tuple[object, ...]) -> Any:
    try:
        await cur.execute(f"SELECT * FROM ({tmpl.sql}) AS m LIMIT 0", args)
    except pymysql.err.Error as exc:
        if error_code(exc) is None or error_code(exc) in LOST_CODES:
            raise
        raise StoreConfigError(
            f"{tmpl.name}: must be a SELECT usable as a derived table: {describe_error(exc)}"
        ) from None
    await cur.fetchall()
    return cur.description or ()
