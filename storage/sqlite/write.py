"""The ordered write path: a batch of ops applied in order inside one transaction.

The batch is regrouped into runs of one kind (``storage.runs``: the same outcome as
its order) and each run is one ``executemany``; a re-key runs op by op, as its
three statements must see the previous re-key's result. Every op is
idempotent, because the writer retries a batch whose outcome it did not learn:

- a save is ``INSERT OR IGNORE`` on the unique ``msgid`` index. A save that
  inserted nothing is compared with the stored row: the same message (a retried
  batch, the broker resending) is fine; another message under that id (a broker bug
  or a hostile client) is refused as ``constraint`` rather than dropped silently.
- a delete of a missing row, a re-key of a missing id and dropping an absent
  pending-replay entry do nothing.

When SQLite refuses the data of a run of several ops, the run's ops are tried one
by one in the same (still open, later rolled back) transaction to name the op:
repeating the ones already applied changes nothing, as they are idempotent.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from typing import Any

from storage.base import TOMBSTONE_TTL_S, WriteRejected
from storage.model import DeleteMessage, DropPendingReplay, RekeyMessage, SaveMessage, StoredMessage, WriteOp
from storage.runs import runs
from storage.sqlite.bookkeeping import DELETE_IF_TOMBSTONED, DROP_PENDING, UPSERT_TOMBSTONE
from storage.sqlite.errors import data_rejection

_INSERT_MSG = (
    "INSERT OR IGNORE INTO mqtt_msg(msgid, sender, topic, qos, retain, payload, arrived) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_STORED = "SELECT sender, topic, qos, retain, payload, arrived FROM mqtt_msg WHERE msgid = ?"
_DELETE_MSG = "DELETE FROM mqtt_msg WHERE msgid = ?"
# OR IGNORE: should a row with new_id already exist, the batch must not fail
# forever on the unique index; the old row is then dropped by _DELETE_MSG.
_REKEY_MSG = "UPDATE OR IGNORE mqtt_msg SET msgid = ? WHERE msgid = ?"

Apply = Callable[[sqlite3.Connection, list[Any], int], None]


def apply(conn: sqlite3.Connection, ops: Sequence[WriteOp], now_ms: int) -> None:
    """Apply ``ops`` on ``conn`` with the outcome of their order (inside the caller's
    transaction; ``storage.runs`` may regroup them); raise
    ``WriteRejected`` naming the op's index when SQLite refuses one op's data."""
    for op_type, indexes in runs(ops):
        kind, run = _KINDS[op_type], [ops[i] for i in indexes]
        try:
            kind(conn, run, now_ms)
        except WriteRejected as exc:  # index within the run
            raise WriteRejected(exc.reason, exc.detail, None if exc.index is None else indexes[exc.index]) from exc
        except Exception as exc:
            if data_rejection(exc) is None:
                raise
            raise _locate(conn, kind, run, now_ms, exc, indexes) from exc


def _locate(
    conn: sqlite3.Connection, kind: Apply, run: list[Any], now_ms: int, exc: Exception, indexes: list[int]
) -> WriteRejected:
    """The refusal ``exc`` of a run, naming the op it is about (``indexes``: the run's
    ops' indexes in the batch)."""
    reason, detail = data_rejection(exc) or ("refused", str(exc))
    if len(run) == 1:
        return WriteRejected(reason, detail, indexes[0])
    if not conn.in_transaction:  # SQLite ended the transaction: trying ops now would commit them
        return WriteRejected(reason, detail)
    for offset, op in enumerate(run):
        try:
            kind(conn, [op], now_ms)
        except WriteRejected as again:
            return WriteRejected(again.reason, again.detail, indexes[offset])
        except Exception as again:
            found = data_rejection(again)
            if found is None:
                raise
            return WriteRejected(*found, index=indexes[offset])
    return WriteRejected(reason, detail)


# -- one function per kind of op ---------------------------------------------------
def _save(conn: sqlite3.Connection, ops: list[SaveMessage], now_ms: int) -> None:
    rows = [_row(op.message, now_ms) for op in ops]
    if conn.executemany(_INSERT_MSG, rows).rowcount < len(rows):
        _refuse_other_content(conn, ops)


def _row(m: StoredMessage, now_ms: int) -> tuple[Any, ...]:
    # a message without a broker timestamp counts from when it was written
    arrived = m.timestamp if m.timestamp > 0 else now_ms
    return (m.msgid, m.sender, m.topic, m.qos, 1 if m.retain else 0, m.payload, arrived)


def _refuse_other_content(conn: sqlite3.Connection, ops: list[SaveMessage]) -> None:
    """Some save found its id stored already: each must be the message stored."""
    for offset, op in enumerate(ops):
        m = op.message
        row = conn.execute(_STORED, (m.msgid,)).fetchone()
        if row is None:
            continue  # inserted, then deleted by a trigger of the operator's: not ours to judge
        sender, topic, qos, retain, payload, arrived = row
        same = (sender, topic, qos, bool(retain), bytes(payload)) == (
            m.sender, m.topic, m.qos, bool(m.retain), bytes(m.payload)
        ) and (m.timestamp <= 0 or arrived == m.timestamp)
        if not same:
            raise WriteRejected("constraint", "another message is stored under this message id", offset)


def _delete(conn: sqlite3.Connection, ops: list[DeleteMessage], now_ms: int) -> None:
    expires = now_ms + TOMBSTONE_TTL_S * 1000
    tombstones = [(op.msgid, expires) for op in ops if op.replay_ack]
    if tombstones:  # the tombstone is written before the delete
        conn.executemany(UPSERT_TOMBSTONE, tombstones)
    conn.executemany(_DELETE_MSG, [(op.msgid,) for op in ops])


def _rekey(conn: sqlite3.Connection, ops: list[RekeyMessage], now_ms: int) -> None:
    for op in ops:
        conn.execute(_REKEY_MSG, (op.new_id, op.old_id))
        conn.execute(_DELETE_MSG, (op.old_id,))
        conn.execute(DELETE_IF_TOMBSTONED, (op.new_id, now_ms))


def _drop_pending(conn: sqlite3.Connection, ops: list[DropPendingReplay], now_ms: int) -> None:
    conn.executemany(DROP_PENDING, [(op.topic, op.digest, op.msgid) for op in ops])


_KINDS: dict[type, Apply] = {
    SaveMessage: _save,
    DeleteMessage: _delete,
    RekeyMessage: _rekey,
    DropPendingReplay: _drop_pending,
}
