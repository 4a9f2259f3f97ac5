"""A batch's ops checked and encoded before anything is sent.

Everything the key layout cannot hold is refused here with ``WriteRejected`` naming
the op, so a batch is either sent whole or not at all:

- ``invalid_id``: a message id that is not a broker GUID (32 hex digits): the
  plugin's key is the base62 of the GUID's number, and reading it back gives those
  32 digits, so nothing else would come back as it was stored.
- ``out_of_range``: qos outside 0..2, a timestamp outside the uint64 milliseconds of
  the exhook ``Message``. The plugin reads a stored hash back into an MQTT message
  (``qos``/``ts`` as integers, docs/plugin-2.0.0-notes.md), so a qos Redis could
  hold as text is still no message anybody can deliver.
- ``invalid_value``: text that is not UTF-8 (lone surrogates): it cannot be sent
  at all, and hiredis would fail the whole pipeline on it.
- ``too_large``: an argument over Redis' bulk limit (512 MiB): Redis answers with a
  protocol error and closes the connection, which would look transient and be
  retried for ever.

Redis has no column widths: long topics, senders and ids of any other length are
stored as they are (there is nothing to truncate).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from storage.base import WriteRejected
from storage.base62 import msgid_to_b62
from storage.model import DeleteMessage, DropPendingReplay, RekeyMessage, SaveMessage, WriteOp
from storage.redis.keys import (
    F_FROM,
    F_ID,
    F_PAYLOAD,
    F_QOS,
    F_RETAIN,
    F_TOPIC,
    F_TS,
    FALSE,
    MAX_BULK,
    TRUE,
    Keys,
    fmt,
    guid_score,
)

_GUID = re.compile(r"[0-9A-Fa-f]{32}")
_UINT64 = 2**64


# (not frozen: built per op on the hot path, and a frozen dataclass costs ten times more to build)
@dataclass(slots=True)
class Save:
    index: int
    key: bytes  # the message hash
    zset: bytes  # its topic's index
    topic: bytes
    b62: bytes
    fields: tuple[object, ...]  # HSET field value ...
    score: bytes


@dataclass(slots=True)
class Delete:
    index: int
    key: bytes
    zset: bytes
    b62: bytes
    tomb: bytes | None  # the tombstone to leave first (ack of a replay)


@dataclass(slots=True)
class Rekey:
    index: int
    old: bytes  # b62 ids
    new: bytes
    old_key: bytes
    new_key: bytes
    zset: bytes
    tomb: bytes  # the new id's tombstone (its ack came first)


@dataclass(slots=True)
class Drop:
    index: int
    key: bytes  # the registry list of (topic, digest)
    msgid: bytes


Op = Save | Delete | Rekey | Drop


def checked(ops: Sequence[WriteOp], keys: Keys, now_ms: float) -> list[Op]:
    """Every op encoded in order (a re-key to the id it has moves nothing and is
    left out); ``WriteRejected`` for the first op that cannot be stored."""
    out: list[Op] = []
    for index, op in enumerate(ops):
        if isinstance(op, SaveMessage):
            out.append(_save(op, index, keys, now_ms))
        elif isinstance(op, DeleteMessage):
            b62 = _b62(op.msgid, "message id", index)
            out.append(Delete(index, keys.message(b62), _zset(keys, op.topic, index), b62,
                              keys.tomb(b62) if op.replay_ack else None))
        elif isinstance(op, RekeyMessage):
            old, new = _b62(op.old_id, "message id", index), _b62(op.new_id, "new message id", index)
            if old != new:
                out.append(Rekey(index, old, new, keys.message(old), keys.message(new),
                                 _zset(keys, op.topic, index), keys.tomb(new)))
        elif isinstance(op, DropPendingReplay):
            pend = keys.pend(text(op.topic, "topic", index), text(op.digest, "digest", index))
            out.append(Drop(index, _key(pend, index), text(op.msgid, "message id", index)))
        else:  # pragma: no cover - the WriteOp union is closed
            raise TypeError(f"unknown write op {op!r}")
    return out


def _save(op: SaveMessage, index: int, keys: Keys, now_ms: float) -> Save:
    msg = op.message
    b62 = _b62(msg.msgid, "message id", index)
    if msg.qos not in (0, 1, 2):
        raise WriteRejected("out_of_range", f"redis: qos {msg.qos} is not 0, 1 or 2", index)
    if not 0 <= msg.timestamp < _UINT64:
        raise WriteRejected("out_of_range", f"redis: timestamp {msg.timestamp} is not a uint64", index)
    if len(msg.payload) > MAX_BULK:
        raise WriteRejected("too_large", f"redis: payload of {len(msg.payload)} bytes is over Redis' bulk "
                            f"limit of {MAX_BULK} bytes", index)
    topic = text(msg.topic, "topic", index)
    fields = (F_ID, b62, F_FROM, text(msg.sender, "sender", index), F_QOS, msg.qos, F_TOPIC, topic,
              F_PAYLOAD, msg.payload, F_TS, msg.timestamp, F_RETAIN, TRUE if msg.retain else FALSE)
    return Save(index, keys.message(b62), _key(keys.index(topic), index), topic, b62, fields,
                fmt(guid_score(msg.msgid, now_ms)))


def text(value: str, what: str, index: int | None) -> bytes:
    """``value`` as UTF-8 within Redis' bulk limit, or ``WriteRejected``."""
    try:
        raw = value.encode()
    except UnicodeEncodeError:
        raise WriteRejected("invalid_value", f"redis: the {what} is not valid UTF-8 text", index) from None
    return _fits(raw, what, index)


def _b62(msgid: str, what: str, index: int) -> bytes:
    if not _GUID.fullmatch(msgid):
        raise WriteRejected("invalid_id", f"redis: {what} {msgid[:40]!r} is not a broker GUID (32 hex digits)",
                            index)
    return msgid_to_b62(msgid).encode()


def _zset(keys: Keys, topic: str, index: int) -> bytes:
    return _key(keys.index(text(topic, "topic", index)), index)


def _key(key: bytes, index: int) -> bytes:
    return _fits(key, "key", index)


def _fits(raw: bytes, what: str, index: int | None) -> bytes:
    if len(raw) > MAX_BULK:
        raise WriteRejected("too_large", f"redis: the {what} of {len(raw)} bytes is over Redis' bulk limit",
                            index)
    return raw
