"""The write path: one ``write(ops)`` = one transaction on one connection.

* every op is checked first (``checks.py``): an op that cannot be written is refused
  by index before anything is sent;
* the batch is regrouped into runs of one kind (``storage.runs``), so that the
  mixed load's alternating saves and deletes are two statements, not one per op
  (only with the default delete and re-key templates, which touch rows by id alone;
  with others, runs are cut where the kind changes);
* a run of saves = one multi-row INSERT when insert_message_sql is a plain
  single-row insert (split only to stay under max_allowed_packet), else the template
  once per message (so that a refusal names the message);
* a run of deletes = the tombstones of the replay acks among them, then one
  ``DELETE ... IN (...)`` (default template) or the template per op;
* a refusal by the server that is about an op's data rolls the transaction back and
  becomes ``WriteRejected``, with the op's index when the failed statement wrote one
  op, else without (the caller splits the batch).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Sequence
from typing import Any

import pymysql

from storage.model import DeleteMessage, DropPendingReplay, RekeyMessage, SaveMessage, StoredMessage, WriteOp
from storage.mysql import bookkeeping
from storage.mysql.checks import PACKET_MARGIN, checked, escaped_size
from storage.mysql.columns import text
from storage.mysql.connection import Connections
from storage.mysql.errors import Deadlock, DuplicateKey, rejection
from storage.mysql.schema import Schema
from storage.mysql.sql_template import PlainInsert, message_values, quote_ident
from storage.mysql.templates import Templates
from storage.runs import runs

log = logging.getLogger(__name__)

# msgids of saves whose batch failed, kept at most (oldest forgotten first)
_UNCERTAIN_MAX = 100_000
_DELETE_CHUNK = 1000
Indexed = list[tuple[int, Any]]  # (index in the batch, op or message)


class WritePath:
    def __init__(self, connections: Connections, templates: Templates) -> None:
        self._db = connections
        self._t = templates
        # Saves of a batch that failed, in any way but a deadlock (which the server
        # rolled back for sure): its commit may have happened without our knowing,
        # so a repeat of these saves first checks which are stored already.
        self.uncertain: dict[str, None] = {}

    async def write(self, ops: Sequence[WriteOp], schema: Schema) -> None:
        if not ops:
            return
        groups = _groups(checked(ops, schema), self._t.regroupable)

        async def once() -> None:
            await self._once(groups, schema)

        try:
            await self._db.retrying(once, lambda: True)
        except DuplicateKey:
            if schema.messages.msgid is None or not any(isinstance(op, SaveMessage) for op in ops):
                raise
            # A unique key refused a save: most likely a message stored by an earlier
            # try whose answer was lost. The saves are uncertain now, so this repeat
            # skips the stored ones; a second refusal is the operator's constraint.
            await self._db.retrying(once, lambda: True)
        for op in ops:
            if isinstance(op, SaveMessage):
                self.uncertain.pop(op.message.msgid, None)

    async def _once(self, groups: list[tuple[type, Indexed]], schema: Schema) -> None:
        try:
            async with self._db.transaction() as cur:
                for kind, items in groups:
                    await self._apply(cur, kind, items, schema)
        except Deadlock:
            raise  # rolled back for sure
        except BaseException:
            self._note_uncertain(groups)
            raise

    async def _apply(self, cur: Any, kind: type, items: Indexed, schema: Schema) -> None:
        if kind is SaveMessage:
            await self._save_many(cur, [(i, op.message) for i, op in items], schema)
        elif kind is DeleteMessage:
            await self._delete_many(cur, items)
        elif kind is RekeyMessage:
            for index, op in items:
                await self._rekey(cur, index, op)
        elif kind is DropPendingReplay:
            for index, op in items:
                await _execute_for(index, bookkeeping.drop_pending(cur, op))
        else:  # pragma: no cover - the WriteOp union is closed
            raise TypeError(f"unknown write op {kind.__name__}")

    def _note_uncertain(self, groups: list[tuple[type, Indexed]]) -> None:
        for kind, items in groups:
            if kind is SaveMessage:
                for _, op in items:
                    self.uncertain[op.message.msgid] = None
        while len(self.uncertain) > _UNCERTAIN_MAX:
            self.uncertain.pop(next(iter(self.uncertain)))

    # -- saves --------------------------------------------------------------------
    async def _save_many(self, cur: Any, items: list[tuple[int, StoredMessage]], schema: Schema) -> None:
        seen: set[str] = set()
        batch = []
        for index, msg in items:
            if msg.msgid not in seen:  # the same message twice in one run: store it once
                seen.add(msg.msgid)
                batch.append((index, msg))
        retried = [m.msgid for _, m in batch if m.msgid in self.uncertain]
        if retried and schema.messages.msgid is not None:
            present = await _stored_ids(cur, schema, retried)
            batch = [(i, m) for i, m in batch if m.msgid not in present]
        if not batch:
            return
        plain = self._t.plain_insert
        if plain is None:
            tmpl = self._t.insert_message
            for index, msg in batch:
                await _execute_for(index, cur.execute(tmpl.sql, tmpl.args(message_values(msg))))
            return
        for chunk in _packet_chunks(plain, batch, schema.max_packet - PACKET_MARGIN):
            flat: list[object] = [arg for _, args in chunk for arg in args]
            only = chunk[0][0] if len(chunk) == 1 else None
            await _execute_for(only, cur.execute(plain.multi_row(len(chunk)), tuple(flat)))

    # -- deletes, re-keys ---------------------------------------------------------
    async def _delete_many(self, cur: Any, items: Indexed) -> None:
        tombstones = [(i, op.msgid) for i, op in items if op.replay_ack]
        if tombstones:
            # The tombstone goes in BEFORE the delete (same transaction): a re-key of
            # this id that is not written yet will find it and delete its row.
            only = tombstones[0][0] if len(tombstones) == 1 else None
            await _execute_for(only, bookkeeping.write_tombstones(cur, [m for _, m in tombstones]))
        if self._t.delete_by_id is not None and len(items) > 1:
            # the default "delete from t where msgid = ${id}": one statement for all
            table, column = self._t.delete_by_id
            msgids = list(dict.fromkeys(op.msgid for _, op in items))
            for start in range(0, len(msgids), _DELETE_CHUNK):
                chunk = msgids[start : start + _DELETE_CHUNK]
                await _execute_for(None, cur.execute(
                    f"DELETE FROM {table} WHERE {column} IN ({bookkeeping.placeholders(len(chunk))})", tuple(chunk)
                ))
            return
        tmpl = self._t.delete_message
        for index, op in items:
            await _execute_for(index, cur.execute(tmpl.sql, tmpl.args({"id": op.msgid, "topic": op.topic})))

    async def _rekey(self, cur: Any, index: int, op: RekeyMessage) -> None:
        acked = await bookkeeping.lock_tombstone(cur, op.new_id)
        rekey = self._t.rekey_message
        await _execute_for(index, cur.execute(
            rekey.sql, rekey.args({"id": op.old_id, "new_id": op.new_id, "topic": op.topic})
        ))
        if acked:
            delete = self._t.delete_message
            await _execute_for(index, cur.execute(delete.sql, delete.args({"id": op.new_id, "topic": op.topic})))


def _groups(ops: Sequence[WriteOp], regroup: bool) -> list[tuple[type, Indexed]]:
    """Runs of ops of one kind (``storage.runs``), each op with its index in the batch."""
    return [(kind, [(i, ops[i]) for i in indexes]) for kind, indexes in runs(ops, regroup)]


def _packet_chunks(
    plain: PlainInsert, batch: list[tuple[int, StoredMessage]], limit: int
) -> list[list[tuple[int, tuple[object, ...]]]]:
    """The rows' parameters, in runs whose statement stays under ``limit`` bytes."""
    head = len(plain.head.sql) + 16
    chunks: list[list[tuple[int, tuple[object, ...]]]] = [[]]
    size = head
    for index, msg in batch:
        args = plain.row.args(message_values(msg))
        row_size = len(plain.row.sql) + 2 + sum(escaped_size(a) for a in args)
        if chunks[-1] and size + row_size > limit:
            chunks.append([])
            size = head
        chunks[-1].append((index, args))
        size += row_size
    return chunks


async def _stored_ids(cur: Any, schema: Schema, msgids: list[str]) -> set[str]:
    col = quote_ident(schema.messages.msgid or "msgid")
    await cur.execute(
        f"SELECT {col} FROM {schema.messages.table} WHERE {col} IN ({bookkeeping.placeholders(len(msgids))})",
        tuple(msgids),
    )
    return {text(r[0]) for r in await cur.fetchall()}


async def _execute_for(index: int | None, statement: Awaitable[object]) -> None:
    """Await one statement; a refusal of its data names the op ``index`` (None when
    the statement wrote several ops)."""
    try:
        await statement
    except (pymysql.err.Error, UnicodeError) as exc:
        rejected = rejection(exc, index)
        if rejected is None:
            raise
        raise rejected from exc
