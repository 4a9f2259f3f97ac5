"""What a failure of SQLite means for the caller: try again, fix the setup, or drop one op.

SQLite reports a result code (``sqlite_errorcode``; the low byte is the primary
code, https://www.sqlite.org/rescode.html); Python's ``sqlite3`` adds errors of its
own while binding parameters (``OverflowError``, ``UnicodeEncodeError``,
``ProgrammingError``), before SQLite sees the value. The classes:

- transient (``StoreError``, retryable): the file is locked by another writer past
  ``busy_timeout`` (BUSY/LOCKED), the disk is full or failing (FULL/IOERR), the
  file or its directory cannot be written (READONLY/CANTOPEN), out of memory.
- the setup is wrong (``StoreConfigError``): a table or column is missing (someone
  changed the schema under a running service; SQLite's generic ERROR code, as the
  statements themselves are fixed), permission or authorisation denied, the file is
  corrupt or not a database. Not about any op: the writer keeps retrying the batch.
- one op's data is refused (``WriteRejected``, index given by the caller when it
  knows which op ran): a constraint of the operator's schema (CHECK, NOT NULL, a
  trigger's RAISE), a value beyond SQLite's limits (TOOBIG, an integer beyond 64
  bits), a datatype mismatch, text that is not UTF-8.
"""

from __future__ import annotations

import sqlite3

from storage.base import StoreConfigError, StoreError, WriteRejected
from storage.errors import joined

# primary result codes (the low byte of sqlite_errorcode)
_ERROR, _PERM, _CORRUPT, _TOOBIG, _CONSTRAINT, _MISMATCH, _AUTH, _NOTADB = 1, 3, 11, 18, 19, 20, 23, 26

_REJECTED = {_TOOBIG: "too_large", _CONSTRAINT: "constraint", _MISMATCH: "invalid_value"}
_SETUP = frozenset({_ERROR, _PERM, _CORRUPT, _AUTH, _NOTADB})


class QueryRefused(StoreError):
    """A read's parameter cannot be sent to SQLite at all (text that is not UTF-8, an
    integer beyond 64 bits): asking again cannot help."""

    retryable = False


def _said(exc: sqlite3.Error) -> str:
    """SQLite's message with the name of its result code, on one line."""
    name = getattr(exc, "sqlite_errorname", None)
    return f"{joined(str(exc))} ({name})" if name else joined(str(exc)) or type(exc).__name__


def data_rejection(exc: BaseException) -> tuple[str, str] | None:
    """``(reason, detail)`` when ``exc`` refuses the data of the statement that raised
    it (see the module docstring), else None."""
    if isinstance(exc, OverflowError):
        return "out_of_range", f"a number does not fit SQLite's 64-bit integers ({joined(str(exc))})"
    if isinstance(exc, UnicodeEncodeError):
        return "invalid_value", f"text is not valid UTF-8 ({exc.reason} at position {exc.start})"
    if not isinstance(exc, sqlite3.Error):
        return None
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:  # raised by the sqlite3 module itself, e.g. binding an unsupported type
        binding = isinstance(exc, (sqlite3.InterfaceError, sqlite3.ProgrammingError)) and "binding" in str(exc)
        return ("invalid_value", _said(exc)) if binding else None
    reason = _REJECTED.get(code & 0xFF)
    return None if reason is None else (reason, _said(exc))


def classify(exc: BaseException, where: str, *, writing: bool) -> StoreError | None:
    """The ``StoreError`` to raise for ``exc``, raised by a statement on the file
    ``where`` (None: not a failure of the store, e.g. a bug, raised as it is). A
    refusal of data is a ``WriteRejected`` without index on writes (the caller finds
    the op) and a non-retryable ``QueryRefused`` on reads."""
    if isinstance(exc, StoreError):
        return exc
    rejected = data_rejection(exc)
    if rejected is not None:
        reason, detail = rejected
        return WriteRejected(reason, detail) if writing else QueryRefused(f"sqlite: {detail}")
    if not isinstance(exc, sqlite3.Error):
        return None
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None and code & 0xFF in _SETUP:
        return StoreConfigError(f"sqlite {where}: {_said(exc)}")
    return StoreError(f"sqlite: {_said(exc)}")
