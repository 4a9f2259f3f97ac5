"""Every op of a batch checked against the schema BEFORE the first round trip.

A value the server would refuse fails the whole transaction, and the writer would
then have to split the batch to find it; a value the server would silently cut
would be replayed wrong. So what the store can tell in advance (text that is not
UTF-8, a qos outside 0..2, a timestamp or a string a column cannot hold, a payload
beyond the column or max_allowed_packet) is refused here, naming the op by index,
and nothing is written. What it cannot tell (templates it does not parse, CHECK
constraints, triggers) the server refuses, see ``errors.py``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

from storage.base import WriteRejected
from storage.model import DeleteMessage, DropPendingReplay, RekeyMessage, SaveMessage, StoredMessage, WriteOp
from storage.mysql.columns import Column
from storage.mysql.ddl import BOOKKEEPING_ID_MAX
from storage.mysql.schema import Schema
from storage.mysql.sql_template import message_values

# Bytes PyMySQL escapes with a backslash (one extra byte each).
_ESCAPED_BYTES = tuple(bytes([b]) for b in b"\x00\n\r\\'\"\x1a")
# Room kept under max_allowed_packet for the statement around the values.
PACKET_MARGIN = 64 * 1024
_ROW_OVERHEAD = 4096
_SENDER = ("from", "clientid")


class Refused(Exception):
    """One value cannot be written: ``reason`` (REJECT_REASONS) and why."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def escaped_size(value: object) -> int:
    """Bytes ``value`` takes in the statement PyMySQL sends (exact for bytes/str)."""
    if isinstance(value, (bytes, bytearray)):
        raw = bytes(value)
        return len(raw) + sum(raw.count(b) for b in _ESCAPED_BYTES) + 10
    if isinstance(value, str):
        raw = value.encode("utf-8", "surrogateescape")
        return len(raw) + sum(raw.count(b) for b in _ESCAPED_BYTES) + 2
    return 24


def checked(ops: Sequence[WriteOp], schema: Schema) -> list[WriteOp]:
    """``ops`` as they will be written (a sender cut to its column); raise
    ``WriteRejected(index=...)`` for the first op that cannot be."""
    out: list[WriteOp] = []
    for index, op in enumerate(ops):
        try:
            out.append(_checked(op, schema))
        except Refused as exc:
            raise WriteRejected(exc.reason, f"mysql: {exc.detail}", index) from None
    return out


def _checked(op: WriteOp, schema: Schema) -> WriteOp:
    if isinstance(op, SaveMessage):
        return SaveMessage(fit_message(op.message, schema))
    if isinstance(op, DeleteMessage):
        utf8(("topic", op.topic), ("msgid", op.msgid))
        if op.replay_ack:
            bookkeeping_id(op.msgid)  # the tombstone's key
    elif isinstance(op, RekeyMessage):
        utf8(("topic", op.topic), ("msgid", op.old_id), ("new msgid", op.new_id))
        bookkeeping_id(op.new_id)  # looked up in the tombstones
        column = schema.messages.fills.get("id")
        if column is not None:
            misfit("new msgid", op.new_id, column)
    elif isinstance(op, DropPendingReplay):
        utf8(("topic", op.topic), ("digest", op.digest), ("msgid", op.msgid))
        bookkeeping_id(op.msgid)
    else:  # pragma: no cover - the WriteOp union is closed
        raise TypeError(f"unknown write op {op!r}")
    return op


def fit_message(msg: StoredMessage, schema: Schema) -> StoredMessage:
    """The message as it will be stored, or ``Refused``. A cut topic or payload
    would replay something else than was published, so those are refused; the
    sender is only informational (replays are published "from" the service), so a
    sender longer than its column is cut to fit, as the plugin's table would."""
    utf8(("topic", msg.topic), ("msgid", msg.msgid), ("sender", msg.sender))
    if not 0 <= msg.qos <= 2:
        raise Refused("out_of_range", f"qos {msg.qos} is not 0, 1 or 2")
    limits = schema.messages.timestamps
    if limits is not None and not limits[0] <= msg.timestamp <= limits[1]:
        raise Refused("out_of_range", f"timestamp {msg.timestamp} is outside what "
                      f"{schema.messages.time} can hold ({limits[0]}..{limits[1]} ms)")
    fills = schema.messages.fills
    values = message_values(msg)
    for placeholder, column in fills.items():
        if placeholder not in _SENDER:
            misfit(placeholder, values[placeholder], column)
    room = schema.max_packet - PACKET_MARGIN - _ROW_OVERHEAD
    # escaping at most doubles the payload: count exactly only when that could matter
    if 2 * len(msg.payload) + 10 > room and escaped_size(msg.payload) > room:
        raise Refused("too_large", f"the payload ({len(msg.payload)} bytes) exceeds the server's "
                                   f"max_allowed_packet ({schema.max_packet})")
    sender = next((fills[p] for p in _SENDER if p in fills), None)
    if sender is not None and not sender.fits(msg.sender):
        msg = replace(msg, sender=sender.truncate(msg.sender))
    return msg


def check_subscription(clientid: str, topic: str, qos: int, fills: Mapping[str, Column]) -> None:
    """Raise ``WriteRejected`` for a subscription the table cannot hold."""
    try:
        utf8(("clientid", clientid), ("topic", topic))
        if not 0 <= qos <= 2:
            raise Refused("out_of_range", f"qos {qos} is not 0, 1 or 2")
        values = {"clientid": clientid, "topic": topic, "qos": qos}
        for placeholder, column in fills.items():
            misfit(placeholder, values[placeholder], column)
    except Refused as exc:
        raise WriteRejected(exc.reason, f"mysql: subscription {exc.detail}") from None


def misfit(name: str, value: object, column: Column) -> None:
    """Raise ``Refused`` when ``value`` cannot be stored in ``column`` as it is."""
    if isinstance(value, bytes):
        if not column.fits(value):
            raise Refused("too_large", f"the {name} ({len(value)} bytes) exceeds column {column.name}")
    elif isinstance(value, str):
        if not column.fits(value):
            raise Refused("too_long", f"the {name} ({len(value)} characters) is longer than column "
                                      f"{column.name} allows")
    elif isinstance(value, int):
        bounds = column.int_range()
        if bounds is not None and not bounds[0] <= value <= bounds[1]:
            raise Refused("out_of_range", f"the {name} {value} is outside column {column.name} "
                                          f"({bounds[0]}..{bounds[1]})")


def utf8(*fields: tuple[str, str]) -> None:
    """Text must encode as UTF-8: a lone surrogate (from a lenient decoder) either
    fails in the driver or reaches the server as bytes utf8mb4 refuses."""
    for name, value in fields:
        if value.isascii():
            continue
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise Refused("invalid_value", f"the {name} is not valid UTF-8 text") from None


def bookkeeping_id(msgid: str) -> None:
    """The replay bookkeeping keys ids as ASCII of at most 64 characters (the
    broker's ids are 32 hex digits)."""
    if not msgid.isascii() or len(msgid) > BOOKKEEPING_ID_MAX:
        raise Refused("invalid_id", f"message id {msgid[:80]!r} is not one the broker makes "
                                    f"(ASCII, at most {BOOKKEEPING_ID_MAX} characters)")
