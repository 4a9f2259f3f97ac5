"""The local spool: write ops the store could not take in time, kept on disk.

When the store is slow or down, a ``message.publish`` must still be answered by its
deadline, and an answered message must not be lost: the writer appends it (and every
write op behind it, acks included, so nothing overtakes it) to this spool, fsync'd,
before the answer. The writer drains the spool into the store, oldest first, once the
store takes writes again, also after a restart.

The spool is an SQLite file of its own (WAL, ``synchronous = FULL``: a committed
append survives a power loss). Every op is one row; a row is deleted once the store
has it. Ops the store refuses for good are moved to the ``set_aside`` table, where an
operator can inspect them (``offline-exhook set-aside``). All file work runs on one
thread of its own, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from storage.model import DeleteMessage, DropPendingReplay, RekeyMessage, SaveMessage, StoredMessage, WriteOp

T = TypeVar("T")

log = logging.getLogger(__name__)

# the columns of one write op, in both tables (see encode/decode)
_OP_COLUMNS_DDL = """
        kind TEXT NOT NULL,
        msgid TEXT NOT NULL,
        topic TEXT NOT NULL,
        sender TEXT NOT NULL DEFAULT '',
        qos INTEGER NOT NULL DEFAULT 0,
        flag INTEGER NOT NULL DEFAULT 0,
        other TEXT NOT NULL DEFAULT '',
        payload BLOB NOT NULL DEFAULT x'',
        ts INTEGER NOT NULL DEFAULT 0"""
_SCHEMA = (
    f"CREATE TABLE IF NOT EXISTS ops (seq INTEGER PRIMARY KEY AUTOINCREMENT, {_OP_COLUMNS_DDL}, "
    "size INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS set_aside (id INTEGER PRIMARY KEY AUTOINCREMENT, at_ms INTEGER NOT NULL, "
    f"backend TEXT NOT NULL, reason TEXT NOT NULL, detail TEXT NOT NULL, {_OP_COLUMNS_DDL})",
)
_COLUMNS = "kind, msgid, topic, sender, qos, flag, other, payload, ts"
# the same columns each cast to the type decode wants: a damaged row moved to set_aside reads back
_CAST_COLUMNS = ("CAST(kind AS TEXT), CAST(msgid AS TEXT), CAST(topic AS TEXT), CAST(sender AS TEXT), "
                 "CAST(qos AS INTEGER), CAST(flag AS INTEGER), CAST(other AS TEXT), CAST(payload AS BLOB), "
                 "CAST(ts AS INTEGER)")
_COLUMN_TYPES = (str, str, str, str, int, int, str, bytes, int)
# set_aside keeps the newest rows only: it is for inspection, not a second store
SET_ASIDE_KEEP = 10_000
SET_ASIDE_MAX_BYTES = 256 << 20  # ... and at most this much payload (16 MiB messages pass the gate)
# bytes a row costs beyond its strings and payload (row header, index entry)
_ROW_OVERHEAD = 64


class SpoolError(Exception):
    """The spool file cannot be opened or written (one line, naming the path)."""


@dataclass(frozen=True, slots=True)
class SpooledOp:
    seq: int
    op: WriteOp


@dataclass(frozen=True, slots=True)
class SetAside:
    at_ms: int
    backend: str
    reason: str
    detail: str
    op: WriteOp


Row = tuple[str, str, str, str, int, int, str, bytes, int]


def encode(op: WriteOp) -> Row:
    """An op as the columns ``kind, msgid, topic, sender, qos, flag, other, payload, ts``."""
    if isinstance(op, SaveMessage):
        m = op.message
        return ("s", m.msgid, m.topic, m.sender, m.qos, int(m.retain), "", m.payload, m.timestamp)
    if isinstance(op, DeleteMessage):
        return ("d", op.msgid, op.topic, "", 0, int(op.replay_ack), "", b"", 0)
    if isinstance(op, RekeyMessage):
        return ("r", op.old_id, op.topic, "", 0, 0, op.new_id, b"", 0)
    return ("p", op.msgid, op.topic, "", 0, 0, op.digest, b"", 0)


def _lenient_text(raw: bytes) -> str:
    """The connections' text factory: bytes that are not UTF-8 (a damaged file) come
    back as surrogates, for ``decode`` to refuse, instead of failing the whole read."""
    return raw.decode("utf-8", "surrogateescape")


def _printable(row: Sequence[Any]) -> list[Any]:
    """A row whose damaged text shows as U+FFFD (for listing set-aside rows)."""
    return [v.encode("utf-8", "surrogateescape").decode("utf-8", "replace") if isinstance(v, str) else v
            for v in row]


def decode(row: Sequence[Any], *, listing: bool = False) -> WriteOp:
    """The op of a row; ValueError for a row no ``encode`` wrote (a damaged file): a
    value of the wrong type would otherwise reach the store, or fail there, and a
    damaged kind or field must not turn into another op (a save read as a drop would
    be lost without a trace). ``listing``: a set-aside row, only shown: whatever its
    fields, it is shown as its kind's op, and as a save (the op that shows every
    column) when the kind itself is damaged."""
    for name, value, wanted in zip(_COLUMNS.split(", "), row, _COLUMN_TYPES, strict=True):
        if type(value) is not wanted:
            raise ValueError(f"column {name} holds {type(value).__name__}, not {wanted.__name__}")
        if isinstance(value, str) and not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"column {name} is not UTF-8") from None
    kind, msgid, topic, sender, qos, flag, other, payload, ts = row
    if kind == "d" and (msgid or listing):
        return DeleteMessage(msgid, topic, replay_ack=bool(flag))
    if kind == "r" and ((msgid and other) or listing):
        return RekeyMessage(msgid, other, topic)
    if kind == "p" and (other or listing):
        return DropPendingReplay(topic, other, msgid)
    if (kind == "s" and msgid and 0 <= qos <= 2) or listing:
        return SaveMessage(StoredMessage(msgid, sender, topic, qos, bool(flag), bytes(payload), ts))
    raise ValueError(f"no op of kind {kind[:8]!r} has these fields")


def _move_damaged(conn: sqlite3.Connection, damaged: list[tuple[int, str]], now: float) -> tuple[int, int]:
    """Move the ``damaged`` rows of ``ops`` (seq, why) to ``set_aside``, each column
    cast to its type so that ``set_aside_rows`` reads them; returns (rows, bytes) moved."""
    removed = freed = 0
    for seq, why in damaged:
        n, size = conn.execute("SELECT count(*), coalesce(sum(CAST(size AS INTEGER)), 0) FROM ops WHERE seq = ?",
                               (seq,)).fetchone()
        conn.execute(f"INSERT INTO set_aside (at_ms, backend, reason, detail, {_COLUMNS}) "
                     f"SELECT ?, 'spool', 'damaged', ?, {_CAST_COLUMNS} FROM ops WHERE seq = ?",
                     (int(now * 1000), f"spool row {seq}: {why}", seq))
        conn.execute("DELETE FROM ops WHERE seq = ?", (seq,))
        removed += n
        freed += size
    return removed, freed


def op_size(op: WriteOp) -> int:
    """Bytes ``op`` takes in the spool (what ``max_bytes`` counts)."""
    _, msgid, topic, sender, _, _, other, payload, _ = encode(op)
    return len(msgid) + len(topic.encode("utf-8", "surrogatepass")) + len(sender) + len(other) + len(payload) \
        + _ROW_OVERHEAD


def _totals(conn: sqlite3.Connection) -> tuple[int, int]:
    """How many ops the spool file holds, and their size."""
    n, size = conn.execute("SELECT count(*), coalesce(sum(size), 0) FROM ops").fetchone()
    return int(n), int(size)


class Spool:
    """One spool file. ``open`` creates it if needed and reads what an earlier run
    left; ``append`` returns once the ops are on disk."""

    def __init__(self, path: str | Path, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path).resolve()
        self._clock = clock
        self._conn: sqlite3.Connection | None = None
        self._thread: ThreadPoolExecutor | None = None
        self.count = 0  # ops waiting
        self.bytes = 0  # their size
        self.damaged = 0  # rows moved to set_aside since open because they could not be read

    async def open(self) -> None:
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="spool")
        try:
            await self._run(self._open_sync)
        except SpoolError:
            await self.close()
            raise

    def _open_sync(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=5)
            conn.text_factory = _lenient_text
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            for statement in _SCHEMA:
                conn.execute(statement)
            self.count, self.bytes = _totals(conn)
        except (sqlite3.Error, OSError) as exc:
            raise SpoolError(f"exhook.spool.path: cannot use {self.path}: {exc}") from None
        self._conn = conn

    async def close(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        conn, self._conn = self._conn, None
        if conn is not None:
            await asyncio.get_running_loop().run_in_executor(thread, conn.close)
        thread.shutdown(wait=True)

    async def _run(self, fn: Callable[[], T]) -> T:
        if self._thread is None:
            raise SpoolError(f"spool {self.path} is closed")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._thread, fn)
        except (sqlite3.Error, OverflowError, ValueError, TypeError) as exc:  # the file, or an op it cannot hold
            raise SpoolError(f"spool {self.path}: {type(exc).__name__}: {exc}") from None

    def _tx(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._conn
        if conn is None:
            raise SpoolError(f"spool {self.path} is closed")
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(conn)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return result

    async def append(self, ops: Sequence[WriteOp]) -> None:
        """Append ``ops`` in order, durably (one fsync'd transaction)."""
        if not ops:
            return
        rows = [(*encode(op), op_size(op)) for op in ops]

        def insert(conn: sqlite3.Connection) -> None:
            conn.executemany(f"INSERT INTO ops ({_COLUMNS}, size) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)

        await self._run(lambda: self._tx(insert))
        self.count += len(rows)
        self.bytes += sum(row[-1] for row in rows)

    async def head(self, limit: int, *, after: int = 0, move_damaged: bool = True,
                   max_bytes: int | None = None) -> list[SpooledOp]:
        """The oldest ``limit`` ops after row ``after``, in order, ending with the row
        that reaches ``max_bytes`` (their sizes as ``op_size`` counts them; always at
        least one row): the spool's one thread reads them, and an append (a publish
        waiting for its answer) waits meanwhile. A row that cannot be decoded (disk
        damage) would block every op behind it: it is moved to the ``set_aside`` table
        (one log line, counted in ``damaged``), or only skipped with ``move_damaged``
        False (a reader that must not change the file)."""
        def read() -> tuple[list[SpooledOp], list[tuple[int, str]], tuple[int, int]]:
            assert self._conn is not None
            cur = self._conn.execute(f"SELECT seq, {_COLUMNS}, size FROM ops WHERE seq > ? ORDER BY seq LIMIT ?",
                                     (after, limit))
            ops, damaged = [], []
            taken = 0
            try:
                for row in cur:  # row by row: the rows beyond max_bytes are never read
                    try:
                        ops.append(SpooledOp(row[0], decode(row[1:-1])))
                    except ValueError as exc:
                        damaged.append((row[0], str(exc)))
                    taken += row[-1] if type(row[-1]) is int else 0  # (a damaged row's size may be anything)
                    if max_bytes is not None and taken >= max_bytes:
                        break
            finally:
                cur.close()
            freed = self._tx(lambda conn: _move_damaged(conn, damaged, self._clock())) \
                if damaged and move_damaged else (0, 0)
            return ops, damaged, freed

        ops, damaged, (removed, freed) = await self._run(read)
        if move_damaged:
            self.count -= removed
            self.bytes -= freed
            self._note_damaged(damaged)
        return ops

    def _note_damaged(self, damaged: list[tuple[int, str]]) -> None:
        for seq, why in damaged:
            self.damaged += 1
            log.error("spool %s: row %d cannot be read: moved to set_aside", self.path, seq,
                      extra={"event": "spool_row_damaged", "path": str(self.path), "seq": seq, "error": why})

    async def remove(self, seqs: Sequence[int]) -> None:
        """Forget ops the store now has (or that were set aside)."""
        if not seqs:
            return

        def delete(conn: sqlite3.Connection) -> tuple[int, int]:
            removed = freed = 0
            for start in range(0, len(seqs), 500):
                chunk = list(seqs[start : start + 500])
                marks = ",".join("?" * len(chunk))
                n, size = conn.execute(f"SELECT count(*), coalesce(sum(size), 0) FROM ops WHERE seq IN ({marks})",
                                       chunk).fetchone()
                conn.execute(f"DELETE FROM ops WHERE seq IN ({marks})", chunk)
                removed += n
                freed += size
            return removed, freed

        removed, freed = await self._run(lambda: self._tx(delete))
        self.count -= removed
        self.bytes -= freed

    async def recount(self) -> int:
        """Count the ops again from the file; returns by how many ``count`` was off.
        ``count`` is kept up to date by this object, so only rows removed or added
        behind its back (an operator deleting a row by hand) make it drift. The caller
        holds what keeps appends and removals out meanwhile (the writer's lock)."""
        def read() -> tuple[int, int]:
            assert self._conn is not None
            return _totals(self._conn)

        n, size = await self._run(read)
        off, self.count, self.bytes = self.count - n, n, size
        return off

    async def set_aside(self, backend: str, reason: str, detail: str, op: WriteOp) -> None:
        """Keep an op the store refused for good, for an operator to inspect."""
        row = (int(self._clock() * 1000), backend, reason, detail, *encode(op))

        def insert(conn: sqlite3.Connection) -> None:
            conn.execute(f"INSERT INTO set_aside (at_ms, backend, reason, detail, {_COLUMNS}) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
            conn.execute("DELETE FROM set_aside WHERE id <= (SELECT max(id) FROM set_aside) - ?", (SET_ASIDE_KEEP,))
            # the newest rows whose payloads fit SET_ASIDE_MAX_BYTES (a rare, bounded scan)
            conn.execute("DELETE FROM set_aside WHERE id IN (SELECT id FROM (SELECT id, sum(length(payload)) "
                         "OVER (ORDER BY id DESC) AS newer FROM set_aside) WHERE newer > ?) "
                         "AND id < (SELECT max(id) FROM set_aside)", (SET_ASIDE_MAX_BYTES,))

        await self._run(lambda: self._tx(insert))

    async def set_aside_rows(self, limit: int) -> list[SetAside]:
        """The newest ops set aside, newest first."""
        def read() -> list[SetAside]:
            assert self._conn is not None
            cur = self._conn.execute(
                f"SELECT at_ms, backend, reason, detail, {_COLUMNS} FROM set_aside ORDER BY id DESC LIMIT ?",
                (limit,))
            return [SetAside(r[0], r[1], r[2], r[3], decode(_printable(r[4:]), listing=True)) for r in cur]

        return await self._run(read)

    async def adopt(self, other: Spool) -> int:
        """Move every op of ``other`` (a spool an earlier run with more workers left)
        behind this spool's ops; returns how many."""
        moved = 0
        while other.count:
            batch = await other.head(1000)
            if not batch:  # every row read was damaged (moved aside), or the count was off
                await other.recount()
                continue
            await self.append([item.op for item in batch])
            await other.remove([item.seq for item in batch])
            moved += len(batch)
        return moved


def spool_files(base: str | Path) -> list[Path]:
    """The spool files of ``base`` on disk: ``base`` itself (one process) and the
    workers' ``base.N``, in that order."""
    base = Path(base).resolve()
    numbered = [p for p in base.parent.glob(base.name + ".*") if p.name[len(base.name) + 1:].isdigit()]
    numbered.sort(key=lambda p: int(p.name[len(base.name) + 1:]))
    return ([base] if base.exists() else []) + numbered


def orphan_paths(base: str | Path, worker: int | None, workers: int) -> list[Path]:
    """Spool files an earlier run left that no process of this run owns: a single
    process (``worker`` None) adopts every worker's ``base.N``; worker 0 of ``workers``
    adopts the single process's ``base`` and ``base.N`` for N >= ``workers``."""
    own = Path(base).resolve()
    found = []
    for path in spool_files(own):
        if path == own:
            if worker == 0:
                found.append(path)
        elif worker is None or int(path.name[len(own.name) + 1:]) >= workers:
            found.append(path)
    return found


# the tables a file needs, and may only have, to be taken for a spool (sqlite_* are SQLite's own)
SPOOL_TABLES = frozenset({"ops", "set_aside"})


def spool_tables(path: Path) -> frozenset[str] | None:
    """The tables of the SQLite file at ``path`` (read-only: a file that is not a spool
    must come out unchanged), None if it is no SQLite file that can be read."""
    uri = f"{path.resolve().as_uri()}?mode=ro"
    try:
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=5)) as conn:
            rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' "
                                "AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\'").fetchall()
    except sqlite3.Error:
        return None
    return frozenset(str(name) for (name,) in rows)


async def adopt_orphans(target: Spool, paths: Sequence[Path]) -> int:
    """Move the ops of each spool file in ``paths`` into ``target``, then delete the
    file (a crash in between only repeats ops, which are idempotent). A file that is
    not a spool (its tables are not exactly the spool's: another program's database
    under a spool's name) is left alone, in one log line."""
    moved = 0
    for path in paths:
        tables = await asyncio.to_thread(spool_tables, path)
        if tables != SPOOL_TABLES:
            found = "not an SQLite file" if tables is None else f"tables: {', '.join(sorted(tables)) or 'none'}"
            log.warning("spool %s: not a spool file (%s): left alone, not taken over", path, found,
                        extra={"event": "spool_not_adopted", "path": str(path)})
            continue
        orphan = Spool(path)
        await orphan.open()
        try:
            moved += await target.adopt(orphan)
        finally:
            await orphan.close()
        for leftover in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            leftover.unlink(missing_ok=True)
    return moved
