"""Values SQLite cannot take, found before a write touches the file.

SQLite's columns have no lengths and its integers are 64 bits, so what can never be
written is: an integer beyond 64 bits (the broker's ``timestamp`` is an unsigned
64-bit field), text that is not UTF-8 (a ``str`` holding surrogates), a string or
blob (or a whole row) longer than ``SQLITE_LIMIT_LENGTH``, a value of a type ``sqlite3`` cannot bind.
A qos outside 0..2 fits the column but is no MQTT qos: storing it would only fail
the replay later, so it is refused here too. Each check names the op by its index
in the batch, so the writer sets exactly that op aside.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from storage.base import WriteRejected
from storage.model import DeleteMessage, DropPendingReplay, RekeyMessage, SaveMessage, StoredMessage, WriteOp

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
# A row's record: a header of one varint per column (at most 9 bytes each, 8 columns)
# plus its integers (at most 8 bytes each). An upper bound: the check never lets
# through a row SQLite refuses, and refuses at most this many bytes below its limit.
_ROW_OVERHEAD = 8 * 9 + 1 + 3 * 8


def check_ops(ops: Sequence[WriteOp], max_length: int) -> None:
    """Raise ``WriteRejected`` (with its index) for the first op SQLite cannot take."""
    for index, op in enumerate(ops):
        if isinstance(op, SaveMessage) and _plainly_fine(op.message, max_length):
            continue
        problem = _problem(op, max_length)
        if problem is not None:
            raise WriteRejected(*problem, index=index)


def _plainly_fine(m: StoredMessage, max_length: int) -> bool:
    """The usual save (ASCII ids and topic, bytes payload, sane numbers), accepted
    in about half the time of the full checks (measured: 0.7 against 1.2 us a
    message, which the writer thread spends holding the GIL); anything else takes
    the full checks, which accept it as well or say what is wrong."""
    msgid, topic, sender, payload, qos, timestamp = m.msgid, m.topic, m.sender, m.payload, m.qos, m.timestamp
    return (
        type(msgid) is str and type(topic) is str and type(sender) is str and type(payload) is bytes
        and type(qos) is int and 0 <= qos <= 2
        and type(timestamp) is int and _INT64_MIN <= timestamp <= _INT64_MAX
        and msgid.isascii() and topic.isascii() and sender.isascii()
        and len(msgid) + len(topic) + len(sender) + len(payload) + _ROW_OVERHEAD <= max_length
    )


def check_subscription(clientid: str, topic: str, qos: int, max_length: int) -> None:
    """Raise ``WriteRejected`` (no index: not a batch) for a subscription SQLite cannot take."""
    problem = _row(max_length, {"clientid": clientid, "topic": topic}, None) or _qos(qos)
    if problem is not None:
        raise WriteRejected(*problem)


def check_texts(max_length: int, **texts: str) -> None:
    """Raise ``WriteRejected`` (no index) for the first of ``texts`` SQLite cannot take."""
    problem = _row(max_length, texts, None)
    if problem is not None:
        raise WriteRejected(*problem)


def _problem(op: WriteOp, max_length: int) -> tuple[str, str] | None:
    if isinstance(op, SaveMessage):
        m = op.message
        return (
            # the sender is metadata, but SQLite has no column length to truncate it
            # to: only text it cannot encode is refused, like any other text
            _row(max_length, {"msgid": m.msgid, "topic": m.topic, "sender": m.sender}, m.payload)
            or _qos(m.qos)
            or _integer("timestamp", m.timestamp)
            or (None if isinstance(m.retain, (bool, int)) else ("invalid_value", "retain is not a boolean"))
        )
    if isinstance(op, DeleteMessage):
        return _row(max_length, {"msgid": op.msgid}, None)
    if isinstance(op, RekeyMessage):
        return _row(max_length, {"old msgid": op.old_id}, None) or _row(max_length, {"new msgid": op.new_id}, None)
    if isinstance(op, DropPendingReplay):
        return _row(max_length, {"topic": op.topic, "digest": op.digest, "msgid": op.msgid}, None)
    return "invalid_value", f"unknown write op {type(op).__name__}"


def _row(max_length: int, texts: Mapping[str, object], payload: object) -> tuple[str, str] | None:
    """SQLite's length limit bounds each value and also the whole row: the texts and
    payload plus at most ``_ROW_OVERHEAD`` bytes of record header and integers."""
    total = _ROW_OVERHEAD
    for field, value in texts.items():
        size = _utf8_size(field, value)
        if isinstance(size, tuple):
            return size
        if size > max_length - _ROW_OVERHEAD:
            return "too_long", f"{field} of {size} bytes is longer than SQLite's limit of {max_length}"
        total += size
    if payload is not None:
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            return "invalid_value", f"payload is {type(payload).__name__}, not bytes"
        size = payload.nbytes if isinstance(payload, memoryview) else len(payload)
        total += size
        if total > max_length:
            return "too_large", f"payload of {size} bytes makes a row larger than SQLite's limit of {max_length}"
    if total > max_length:
        return "too_long", f"a row of {total} bytes is larger than SQLite's limit of {max_length}"
    return None


def _utf8_size(field: str, value: object) -> int | tuple[str, str]:
    """The bytes ``value`` takes as UTF-8, or why it is no text SQLite can take."""
    if not isinstance(value, str):
        return "invalid_value", f"{field} is {type(value).__name__}, not text"
    if value.isascii():
        return len(value)
    try:
        return len(value.encode("utf-8"))
    except UnicodeEncodeError as exc:
        return "invalid_value", f"{field} is not valid UTF-8 ({exc.reason} at position {exc.start})"


def _qos(qos: object) -> tuple[str, str] | None:
    if isinstance(qos, int) and 0 <= qos <= 2:
        return None
    return "out_of_range", f"qos {qos!r} is not 0, 1 or 2"


def _integer(field: str, value: object) -> tuple[str, str] | None:
    if not isinstance(value, int):
        return "invalid_value", f"{field} is {type(value).__name__}, not an integer"
    if _INT64_MIN <= value <= _INT64_MAX:
        return None
    return "out_of_range", f"{field} {value} does not fit SQLite's 64-bit integers"
