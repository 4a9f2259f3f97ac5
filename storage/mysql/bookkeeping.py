"""Replay bookkeeping in this service's own tables (``ddl.py``): per-connection replay
marks, tombstones of replay acks and the v2 pending-replay registry.

Keys that can be long (connection ids, topics) are SHA-256 digests; ``expires`` is
unix seconds on the server's clock (UNIX_TIMESTAMP()), so instances with skewed
clocks agree.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from storage.base import PENDING_REPLAY_TTL_S, REPLAY_MARK_TTL_S, TOMBSTONE_TTL_S, StoreError
from storage.model import DropPendingReplay, PendingReplay
from storage.mysql.columns import text
from storage.mysql.connection import Connections
from storage.mysql.ddl import MARK_TABLE, PENDING_TABLE, TOMBSTONE_TABLE
from storage.mysql.errors import connection_lost, refused_by_server

log = logging.getLogger(__name__)

_REGISTER_CHUNK = 500

# The claim of one topic in one statement (a restore's replay of an exact filter: most
# claims). It raises the mark and hands the previous one back as the statement's insert
# id (LAST_INSERT_ID(expr), sent in the OK packet; 0: the row is new, or its mark expired
# or unset). Each branch of the IF sets the insert id as it computes the new position,
# which is never lower than the old one. Positions here are message ids, integers as the
# insert id is (FLOOR: a fractional mark reads as the id it covers, as reads do). The
# five round trips of a transaction were a third of a reconnect storm's statements.
_CLAIM_ONE = (
    f"INSERT INTO {MARK_TABLE} (conn_hash, topic_hash, position, expires) "
    "VALUES (%s, %s, %s, UNIX_TIMESTAMP() + %s) "
    "ON DUPLICATE KEY UPDATE position = IF(expires < UNIX_TIMESTAMP() OR position IS NULL, "
    "VALUES(position) + 0 * LAST_INSERT_ID(0), "
    "GREATEST(position, VALUES(position)) + 0 * LAST_INSERT_ID(FLOOR(position))), "
    "expires = VALUES(expires)"
)
# the claims in doubt remembered at most (the oldest are forgotten beyond)
_IN_DOUBT_MAX = 100_000
# after a failed check of the single-statement claim (the store down), claims use the
# transaction for this long before the next check
_CHECK_AGAIN_S = 30.0


def sha(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()


def pending_key(topic: str, digest: str) -> bytes:
    return sha(f"{topic}\0{digest}")


def placeholders(count: int) -> str:
    return ", ".join(["%s"] * count)


# -- inside a write transaction ------------------------------------------------------


async def write_tombstones(cur: Any, msgids: Sequence[str]) -> None:
    """Remember replay acks (before their delete, in the same transaction): a re-key
    to one of these ids that is not written yet finds it and deletes its row."""
    values = ", ".join(["(%s, UNIX_TIMESTAMP() + %s)"] * len(msgids))
    args: list[object] = []
    for msgid in msgids:
        args += [msgid, TOMBSTONE_TTL_S]
    await cur.execute(
        f"INSERT INTO {TOMBSTONE_TABLE} (msgid, expires) VALUES {values} "
        "ON DUPLICATE KEY UPDATE expires = VALUES(expires)",
        tuple(args),
    )


async def lock_tombstone(cur: Any, msgid: str) -> bool:
    """Whether a live tombstone exists for ``msgid``. Locks the key first (record lock
    if present, gap lock if not): a concurrent replay ack on another instance either
    committed its tombstone before (we see it) or waits until we commit (its delete
    then finds the row under the new id)."""
    await cur.execute(
        f"SELECT expires >= UNIX_TIMESTAMP() FROM {TOMBSTONE_TABLE} WHERE msgid = %s FOR UPDATE", (msgid,)
    )
    row = await cur.fetchone()
    return bool(row and row[0])


async def drop_pending(cur: Any, op: DropPendingReplay) -> None:
    """Delete one registry entry of this topic, payload digest and id (the oldest, as
    ``take_pending_replay`` would pop it). Entries are interchangeable when all three
    match: two replays of one message to two subscribers register two, and each
    replay removes one. A repeat of the op deletes nothing once its entry is gone;
    only if the batch is repeated after a lost commit while a second identical entry
    exists does it take that one too, and the worst that follows is that the other
    replay, coming back through another instance, is stored again (a duplicate),
    never that an entry outlives its replay and swallows an unrelated publish."""
    await cur.execute(
        f"DELETE FROM {PENDING_TABLE} WHERE key_hash = %s AND msgid = %s ORDER BY id LIMIT 1",
        (pending_key(op.topic, op.digest), op.msgid),
    )


# -- own transactions ----------------------------------------------------------------


class Bookkeeping:
    def __init__(self, connections: Connections) -> None:
        self._db = connections
        self._in_doubt: OrderedDict[tuple[bytes, bytes], None] = OrderedDict()  # (connection, topic) keys
        # one statement per claim of one topic; None: not checked yet, False: the server's
        # insert id does not carry LAST_INSERT_ID(expr) (check_single_statement_claim)
        self.single_statement_claims: bool | None = None
        self._checking = asyncio.Lock()
        self._check_after = 0.0  # monotonic time before which no check is tried

    async def claim_replay(self, connection: str, highs: dict[str, float]) -> dict[str, float | None]:
        if not highs:
            return {}
        conn_key = sha(connection)
        if len(highs) == 1:
            [(topic, high)] = highs.items()
            if float(high).is_integer() and await self._single_statement_claims():
                return {topic: await self._claim_one(conn_key, sha(topic), float(high))}
        # Sorted keys: every claim locks rows in the same order (no lock cycles).
        items = sorted((sha(topic), topic, float(high)) for topic, high in highs.items())
        committing = False

        async def attempt() -> dict[bytes, float | None]:
            nonlocal committing
            async with self._db.connection() as conn, conn.cursor() as cur:
                await conn.begin()
                previous = await _claim(cur, conn_key, [(key, high) for key, _, high in items])
                committing = True
                await conn.commit()
                return previous

        # A claim is not idempotent (a repeat would see its own marks): repeat after
        # a lost connection only if the commit was not sent yet.
        keys = [(conn_key, key) for key, _, _ in items]
        previous = await self._in_doubt_if_failed(
            keys, lambda: committing, self._db.retrying(attempt, lambda: not committing))
        return {topic: previous.get(key) for key, topic, _ in items}

    async def _claim_one(self, conn_key: bytes, topic_key: bytes, high: float, doubt: bool = True) -> float | None:
        sent = False

        async def attempt() -> dict[bytes, float | None]:
            nonlocal sent
            async with self._db.connection() as conn, conn.cursor() as cur:
                sent = True
                await cur.execute(_CLAIM_ONE, (conn_key, topic_key, high, REPLAY_MARK_TTL_S))
                return {topic_key: float(cur.lastrowid) if cur.lastrowid else None}

        previous = await self._in_doubt_if_failed(
            [(conn_key, topic_key)], lambda: sent and doubt, self._db.retrying(attempt, lambda: not sent))
        return previous[topic_key]

    async def _in_doubt_if_failed(self, keys: list[tuple[bytes, bytes]], applied_maybe: Callable[[], bool],
                                  claim: Awaitable[dict[bytes, float | None]]) -> dict[bytes, float | None]:
        """Run ``claim`` (previous marks by topic key). A claim that failed once it may
        have been applied (its statement or COMMIT sent: the connection failed, the
        deadline passed) may have raised the marks without anyone learning the previous
        ones; claiming again would take its own marks for them and replay nothing (a
        gap). So the next claim of those keys in this process answers None: replay from
        the oldest, a duplicate at worst."""
        try:
            previous = await claim
        except BaseException as exc:
            refused = isinstance(exc, StoreError) and exc.__cause__ is not None and refused_by_server(exc.__cause__)
            if applied_maybe() and not refused:
                for key in keys:
                    self._in_doubt[key] = None
                    self._in_doubt.move_to_end(key)
                while len(self._in_doubt) > _IN_DOUBT_MAX:
                    self._in_doubt.popitem(last=False)
                if isinstance(exc, StoreError) and connection_lost(exc):
                    self._db.drop_idle_connections()  # they most likely died with this one
            raise
        for key in keys:
            if key in self._in_doubt:
                del self._in_doubt[key]
                previous[key[1]] = None
        return previous

    async def _single_statement_claims(self) -> bool:
        if self.single_statement_claims is None and time.monotonic() >= self._check_after:
            async with self._checking:  # a storm's first claims wait for one check
                if self.single_statement_claims is None and time.monotonic() >= self._check_after:
                    try:
                        await self.check_single_statement_claim()
                    except StoreError:
                        # the store is failing: the claims waiting here use the transaction
                        # (and fail or not on their own) rather than each try the check again
                        self._check_after = time.monotonic() + _CHECK_AGAIN_S
        return bool(self.single_statement_claims)

    async def check_single_statement_claim(self) -> None:
        """Whether this server hands ``LAST_INSERT_ID(expr)`` back as the insert id of an
        ``INSERT ... ON DUPLICATE KEY UPDATE`` (MariaDB and MySQL do; a look-alike server
        may not). Tried once, at the first claim (not at open: a server that is read-only
        for a while must not keep the store from opening), on a key of its own; if not,
        every claim keeps the transaction. A failure leaves it to the next claim."""
        conn_key, topic_key = sha(f"offline-exhook check {secrets.token_hex(8)}"), sha("check")
        try:
            first = await self._claim_one(conn_key, topic_key, 5.0, doubt=False)
            second = await self._claim_one(conn_key, topic_key, 7.0, doubt=False)
        finally:
            with contextlib.suppress(StoreError):  # else its row expires with REPLAY_MARK_TTL_S
                await self._db.query(f"DELETE FROM {MARK_TABLE} WHERE conn_hash = %s", (conn_key,))
        self.single_statement_claims = (first, second) == (None, 5.0)
        if not self.single_statement_claims:
            log.warning("mysql: the server does not return LAST_INSERT_ID(expr) as the insert id "
                        "(got %r and %r for 0 and 5): replay claims use a transaction each", first, second,
                        extra={"event": "mysql_claim_check"})

    async def reset_replay_marks(self, connection: str) -> None:
        await self._db.query(f"DELETE FROM {MARK_TABLE} WHERE conn_hash = %s", (sha(connection),))

    async def register_pending_replays(self, items: Sequence[PendingReplay]) -> None:
        # One statement per chunk: auto-increment ids follow the list order, and
        # take_pending_replay pops the lowest id first (FIFO per topic and digest).
        # Not repeated after a lost connection: a second copy of an entry could later
        # claim an unrelated publish with the same topic and payload.
        for start in range(0, len(items), _REGISTER_CHUNK):
            chunk = items[start : start + _REGISTER_CHUNK]
            args: list[object] = []
            for item in chunk:
                args += [pending_key(item.topic, item.digest), item.msgid, PENDING_REPLAY_TTL_S]
            values = ", ".join(["(%s, %s, UNIX_TIMESTAMP() + %s)"] * len(chunk))
            await self._db.query(
                f"INSERT INTO {PENDING_TABLE} (key_hash, msgid, expires) VALUES {values}", tuple(args), repeat=False
            )

    async def take_pending_replay(self, topic: str, digest: str) -> str | None:
        key = pending_key(topic, digest)
        committing = False

        async def attempt() -> str | None:
            nonlocal committing
            async with self._db.connection() as conn, conn.cursor() as cur:
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
                return text(row[1])

        return await self._db.retrying(attempt, lambda: not committing)


async def _claim(cur: Any, conn_key: bytes, items: list[tuple[bytes, float]]) -> dict[bytes, float | None]:
    """Raise the marks of ``items`` (topic key, high) and return the previous ones."""
    # 1. Create missing marks / forget expired ones. INSERT ... ON DUPLICATE KEY UPDATE
    #    takes exclusive locks on new and existing rows alike, so two first claims
    #    queue up instead of deadlocking (INSERT IGNORE would take shared locks and
    #    deadlock on the upgrade).
    values = ", ".join(["(%s, %s, NULL, UNIX_TIMESTAMP() + %s)"] * len(items))
    args: list[object] = []
    for topic_key, _ in items:
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
        f"AND topic_hash IN ({placeholders(len(items))}) FOR UPDATE",
        (conn_key, *[key for key, _ in items]),
    )
    previous = {bytes(key): (float(pos) if pos is not None else None) for key, pos in await cur.fetchall()}
    # 3. Raise them.
    values = ", ".join(["(%s, %s, %s, UNIX_TIMESTAMP() + %s)"] * len(items))
    args = []
    for topic_key, high in items:
        args += [conn_key, topic_key, high, REPLAY_MARK_TTL_S]
    await cur.execute(
        f"INSERT INTO {MARK_TABLE} (conn_hash, topic_hash, position, expires) VALUES {values} "
        "ON DUPLICATE KEY UPDATE position = IF(position IS NULL OR position < VALUES(position), "
        "VALUES(position), position)",
        tuple(args),
    )
    return previous
