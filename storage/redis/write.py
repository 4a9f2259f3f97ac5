"""The write path: ``write(ops)`` in phases, one pipeline round trip each, only when needed.

    A  first:   (if re-keys) HGETALL / PTTL / ZSCORE of each re-keyed message and
                HGET of its new key; in cluster mode also the tombstones of replay acks
    B  hashes:  HSET+EXPIRE (save), [SET tombstone] DEL (delete), HSET+PEXPIRE (new
                copy), LREM (drop a pending replay)
    C  indexes: ZADD (save), ZREM (delete), ZADD new + ZREM old (re-key),
                then ZREMRANGEBYSCORE per topic (trimming, as the plugin)
    D  topics:  ZADD {mp}~ox:topics (saved topics), DEL old hash + EXISTS tombstone (re-key)
    E  fix:     (if a tombstone was found) DEL + ZREM of the new copy

In single/sentinel mode B, C and D are one pipeline on one connection, executed in
order: a batch of saves is ONE round trip. In cluster mode keys live on different
nodes and redis-py's cluster pipeline runs each node's share concurrently, so
B, C, D are separate round trips where cross-key order matters: a hash exists
before its index member (a reader never mistakes a message being written for a
dangling member and removes it), an index member exists before its topic is
(re-)added to the topic index (see purge.py), a tombstone exists before the delete
it guards, a new copy exists before the tombstone check. Every op is idempotent;
a re-key whose old message is gone still checks the tombstone (a retried batch).

Refusals. ``ops.py`` refuses what cannot be stored before the first round trip.
The server can still refuse one op's command: WRONGTYPE, when a topic is spelled
like a stored message's b62 id (the two share the plugin's ``{mp}:`` namespace) or
a message id's key holds such a topic. The phase's replies are read by op; the
refused op's commands that went through are taken back (a save's hash and index
member; its topic leaves the topic index if its key holds no sorted set) and
``WriteRejected`` names the op. A re-key is checked in phase A (its new key must be
a hash or nothing), so it is refused before anything moves. A delete refused on
its index has still deleted the hash, which is what an ack asks for. Left as is:
the EXPIRE that came with a save refused on its hash key lands on the other key.

Limits. A position comes from the broker's clock: a message whose write reaches
Redis after a replay claim of a later position (e.g. stuck in a retried batch) is
not replayed again on that same connection (it stays stored for the next one). A
re-key racing an ack of the *old* id may leave the moved copy stored (replayed once
more later, never lost).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from storage.base import TOMBSTONE_TTL_S, StoreError, WriteRejected
from storage.config import RedisConfig
from storage.model import WriteOp
from storage.redis.keys import F_ID, Cmd, Keys, fmt
from storage.redis.link import Link
from storage.redis.ops import Delete, Drop, Rekey, Save, checked
from storage.redis.rounds import Reply, Round, refusals

log = logging.getLogger(__name__)


class _Saved:
    """A planned save and the replies that say what of it went through."""

    __slots__ = ("hset", "op", "zadd")

    def __init__(self, op: Save, hset: Reply, zadd: Reply) -> None:
        self.op, self.hset, self.zadd = op, hset, zadd

    def undo(self, keys: Keys) -> list[Cmd]:
        """Commands that take back what of this save was written."""
        cmds: list[Cmd] = []
        if self.hset.done:
            cmds.append(("DEL", self.op.key))
        if self.zadd.done:
            cmds.append(("ZREM", self.op.zset, self.op.b62))
        elif self.zadd.refused:  # the topic's key holds no sorted set: not a topic to list
            cmds.append(("ZREM", keys.topics, self.op.topic))
        return cmds


class _Move:
    """A re-key: what phase A read of the old message, then its tombstone check."""

    __slots__ = ("fields", "op", "pttl", "score", "target", "tombstone")

    def __init__(self, op: Rekey, first: Round) -> None:
        i = op.index
        self.op = op
        self.fields = first.add(i, "HGETALL", op.old_key)
        self.pttl = first.add(i, "PTTL", op.old_key)
        self.score = first.add(i, "ZSCORE", op.zset, op.old)
        # refused (WRONGTYPE) if the new id's key holds something else: set aside before anything moved
        self.target = first.add(i, "HGET", op.new_key, F_ID)
        self.tombstone: Reply | None = None


class _Phases:
    """The rounds of one batch, by phase (A, B, C, D above)."""

    def __init__(self) -> None:
        self.first = Round("write (read phase)")
        self.hashes = Round("write (hashes)")
        self.indexes = Round("write (indexes)")
        self.topics = Round("write (topics, tombstones)")


class Writer:
    def __init__(self, link: Link, keys: Keys, cfg: RedisConfig) -> None:
        self._link, self._keys, self._cfg = link, keys, cfg
        self._ttl = int(cfg.message_ttl)

    async def write(self, ops: Sequence[WriteOp]) -> None:
        if not ops:
            return
        now_ms = time.time() * 1000.0
        ph = _Phases()
        saved: dict[int, _Saved] = {}
        moves: list[_Move] = []
        topics: dict[bytes, Save] = {}  # saved topic -> its first save
        for op in checked(ops, self._keys, now_ms):
            if isinstance(op, Save):
                saved[op.index] = self._save(ph, op)
                topics.setdefault(op.topic, op)
            elif isinstance(op, Delete):
                self._delete(ph, op)
            elif isinstance(op, Drop):
                # one entry: another replay of the same message may be pending too
                ph.hashes.add(op.index, "LREM", op.key, 1, op.msgid)
            else:
                moves.append(_Move(op, ph.first))
        self._topics(ph, list(topics.values()), now_ms)
        await self._send(ph.first, saved)
        for move in moves:
            self._move(ph, move)
        if self._link.cluster:
            for rnd in (ph.hashes, ph.indexes, ph.topics):
                await self._send(rnd, saved)
        else:
            await self._send_at_once(ph, saved)
        await self._honour_tombstones(moves, saved)

    def _save(self, ph: _Phases, op: Save) -> _Saved:
        hset = ph.hashes.add(op.index, "HSET", op.key, *op.fields)
        if self._ttl > 0:
            ph.hashes.add(op.index, "EXPIRE", op.key, self._ttl)
        return _Saved(op, hset, ph.indexes.add(op.index, "ZADD", op.zset, op.score, op.b62))

    def _delete(self, ph: _Phases, op: Delete) -> None:
        if op.tomb is not None:
            (ph.first if self._link.cluster else ph.hashes).add(
                op.index, "SET", op.tomb, 1, b"EX", TOMBSTONE_TTL_S)
        ph.hashes.add(op.index, "DEL", op.key)
        ph.indexes.add(op.index, "ZREM", op.zset, op.b62)

    def _topics(self, ph: _Phases, firsts: list[Save], now_ms: float) -> None:
        """Trim each saved topic (as the plugin does on publish) and list it in the
        topic index. A trim is charged to the topic's first save: it fails with it."""
        if not firsts:
            return
        if self._ttl > 0:
            deadline = fmt(now_ms - self._ttl * 1000.0)
            for op in firsts:
                ph.indexes.add(op.index, "ZREMRANGEBYSCORE", op.zset, b"-inf", deadline)
        args: list[object] = ["ZADD", self._keys.topics]
        for op in firsts:
            args += (0, op.topic)
        ph.topics.add(None, *args)

    def _move(self, ph: _Phases, move: _Move) -> None:
        """Plan a re-key from what phase A read of the old message."""
        op, i = move.op, move.op.index
        fields, pttl, score = move.fields.value, move.pttl.value, move.score.value
        if fields and score is not None and pttl != -2:
            args: list[object] = ["HSET", op.new_key]
            for k, v in fields.items():
                args += (k, op.new if k == F_ID else v)
            ph.hashes.add(i, *args)
            if pttl > 0:
                ph.hashes.add(i, "PEXPIRE", op.new_key, pttl)
            ph.indexes.add(i, "ZADD", op.zset, fmt(float(score)), op.new)
            ph.indexes.add(i, "ZREM", op.zset, op.old)
            ph.topics.add(i, "DEL", op.old_key)
        elif fields:  # the index member is gone (acked or expired meanwhile)
            ph.topics.add(i, "DEL", op.old_key)
        else:  # nothing to move (gone, or moved by an earlier attempt)
            ph.indexes.add(i, "ZREM", op.zset, op.old)
        move.tombstone = ph.topics.add(i, "EXISTS", op.tomb)

    async def _send_at_once(self, ph: _Phases, saved: dict[int, _Saved]) -> None:
        """Single/sentinel: B, C, D in one pipeline, then WAIT for replicas: a message
        is answered as stored only once a replica has it, so a failover keeps it.
        Fewer confirmations than asked fail the write (retryable): the writer tries
        again and, past its patience, keeps the batch in its spool; a write that only
        the master has may be lost when a sentinel demotes that master."""
        rnd = Round("write").then(ph.hashes, ph.indexes, ph.topics)
        wait = None
        if rnd and self._cfg.wait_replicas > 0:
            wait = rnd.add(None, "WAIT", self._cfg.wait_replicas, self._cfg.wait_timeout_ms)
        await self._send(rnd, saved)
        if wait is not None and int(wait.value) < self._cfg.wait_replicas:
            raise StoreError(f"redis: only {int(wait.value)} of {self._cfg.wait_replicas} replicas "
                             f"confirmed a write within {self._cfg.wait_timeout_ms} ms")

    async def _honour_tombstones(self, moves: list[_Move], saved: dict[int, _Saved]) -> None:
        """E: the ack of a moved copy came first: delete the copy."""
        fix = Round("write (acked replays)")
        for move in moves:
            if move.tombstone is not None and move.tombstone.value:
                fix.add(move.op.index, "DEL", move.op.new_key)
                fix.add(move.op.index, "ZREM", move.op.zset, move.op.new)
        await self._send(fix, saved)

    async def _send(self, rnd: Round, saved: dict[int, _Saved]) -> None:
        """Run one phase; if the server refused an op, take back what of it went
        through and raise ``WriteRejected`` for the first such op."""
        await self._link.send(rnd)
        refused = refusals(rnd)
        if not refused:
            return
        undo = [cmd for index in sorted(refused) if index in saved for cmd in saved[index].undo(self._keys)]
        await self._link.run(undo, "write (take back a refused op)")
        index = min(refused)
        reason, detail = refused[index]
        raise WriteRejected(reason, detail, index)
