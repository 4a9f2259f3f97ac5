"""What a MySQL / MariaDB failure means for the caller: one classification.

* the server refused an op's data (too long, out of range, incorrect value,
  constraint): ``WriteRejected`` -- trying the same op again cannot help;
* the table, a column, a privilege or the template is wrong (someone changed the
  schema under a running service): ``StoreConfigError``;
* a deadlock or lock wait timeout: ``Deadlock`` (the server rolled the transaction
  back; the store repeats it at once, a few times);
* everything else (connection lost or refused, timeouts, a read-only server, too
  many connections, out of memory, the server shutting down): a plain, retryable
  ``StoreError``.

Error text is one line with the server's code and message. Neither the driver nor
the server put the password into a message; the server does quote the value it
refused (e.g. a few bytes of a topic), which is what an operator needs to find it.
"""

from __future__ import annotations

import ssl

import pymysql

from storage.base import StoreConfigError, StoreError, WriteRejected
from storage.errors import joined

# The server's refusal of one op's data -> REJECT_REASONS (storage/base.py).
# Codes: MariaDB / MySQL "Server Error Message Reference".
_REJECT_CODES: dict[int, str] = {
    1406: "too_long",  # Data too long for column
    1264: "out_of_range",  # Out of range value for column
    1690: "out_of_range",  # BIGINT value is out of range (arithmetic in a template)
    1441: "out_of_range",  # Datetime function: field overflow
    1292: "invalid_value",  # Truncated incorrect (datetime / unixtime) value
    1366: "invalid_value",  # Incorrect string value (bytes that are not utf8mb4)
    1367: "invalid_value",  # Illegal value during parsing
    1265: "invalid_value",  # Data truncated for column (enum, set, decimal)
    1300: "invalid_value",  # Invalid utf8mb4 character string
    1411: "invalid_value",  # Incorrect value for function
    3140: "invalid_value",  # Invalid JSON text (MySQL)
    1048: "constraint",  # Column cannot be null
    1062: "constraint",  # Duplicate entry for key
    1586: "constraint",  # Duplicate entry for key (with the key's name)
    1216: "constraint",  # foreign key: no parent row
    1217: "constraint",  # foreign key: row is referenced
    1451: "constraint",  # foreign key: row is referenced
    1452: "constraint",  # foreign key: no parent row
    3819: "constraint",  # CHECK constraint violated (MySQL)
    4025: "constraint",  # CONSTRAINT failed (MariaDB CHECK)
    1153: "too_large",  # Got a packet bigger than max_allowed_packet
    1301: "too_large",  # Result larger than max_allowed_packet
}
DUPLICATE_KEY_CODES = frozenset({1062, 1586})
# Reachable but unusable as configured: access, database, table, column, template.
CONFIG_CODES = frozenset(
    {1044, 1045, 1046, 1049, 1054, 1064, 1109, 1142, 1143, 1146, 1227, 1356, 1370, 1449, 1698, 3159}
)
# The server rolled the transaction back: repeat it at once.
DEADLOCK_CODES = frozenset({1213, 1205})
# The connection is gone (server restart, network cut): a pooled one may be dead too.
LOST_CODES = frozenset({2006, 2013, 2055})


class Deadlock(StoreError):
    """A transaction the server rolled back (deadlock / lock wait timeout)."""


class DuplicateKey(WriteRejected):
    """A unique key refused a row. Either a save that was committed before is sent
    again (the write path checks and skips it) or the operator's schema forbids the
    row (then it is a rejection like any other)."""


def error_code(exc: BaseException) -> int | None:
    if isinstance(exc, pymysql.err.Error) and exc.args and isinstance(exc.args[0], int):
        return int(exc.args[0])
    return None


def refused_by_server(exc: BaseException) -> bool:
    """Whether the server answered ``exc``, refusing the statement (it rolled it back;
    the connection is healthy). Codes from 2000 on are the client's own: a connection
    lost or never made, where the statement may or may not have run."""
    code = error_code(exc)
    return code is not None and code < 2000


def describe_error(exc: BaseException) -> str:
    """One line: the server's code and message, plus the TLS / socket cause that
    aiomysql hides behind "Can't connect"."""
    code = error_code(exc)
    if code is not None:
        msg = exc.args[1] if len(exc.args) > 1 else ""
        text = f"[{code}] {msg}"
    else:
        text = f"{type(exc).__name__}: {exc}"
    return joined(text + _cause(exc))


def _cause(exc: BaseException) -> str:
    seen: set[int] = {id(exc)}
    cause = exc.__cause__ or exc.__context__
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f" (TLS: certificate verify failed: {cause.verify_message or cause.reason or cause})"
        if isinstance(cause, ssl.SSLError):
            return f" (TLS: {cause.reason or cause})"
        if isinstance(cause, OSError):
            return f" ({cause.strerror or cause})"
        cause = cause.__cause__ or cause.__context__
    return ""


def rejection(exc: BaseException, index: int | None = None) -> WriteRejected | None:
    """The ``WriteRejected`` this failure is, or None when it is not about the data."""
    if isinstance(exc, UnicodeError):
        # PyMySQL encodes text itself: a lone surrogate never reaches the server
        return WriteRejected("invalid_value", f"mysql: text that is not UTF-8 ({type(exc).__name__})", index)
    code = error_code(exc)
    reason = _REJECT_CODES.get(code) if code is not None else None
    if reason is None:
        return None
    detail = f"mysql: {describe_error(exc)}"
    if code in DUPLICATE_KEY_CODES:
        return DuplicateKey(reason, detail, index)
    return WriteRejected(reason, detail, index)


def classify(exc: BaseException) -> StoreError:
    """The ``StoreError`` (or subclass) a driver / socket failure is."""
    rejected = rejection(exc)
    if rejected is not None:
        return rejected
    code = error_code(exc)
    text = f"mysql: {describe_error(exc)}"
    if code in DEADLOCK_CODES:
        return Deadlock(text)
    if code in CONFIG_CODES:
        return StoreConfigError(text)
    return StoreError(text)


def connection_lost(exc: BaseException) -> bool:
    """Whether ``exc`` (a classified ``StoreError``) says the connection went away."""
    cause = exc.__cause__
    if cause is None:
        return False
    return error_code(cause) in LOST_CODES or isinstance(cause, ConnectionError)
