"""Replay bookkeeping shared by every service instance through Redis: the replay
marks of a connection and the v2 pending-replay registry. (Tombstones of replay
acks are written with the ops they guard, in ``write.py``; so is the removal of
one registry entry, ``DropPendingReplay``.)

redis-py sends a command again when its connection fails before the reply arrives
(``clients.py``), although Redis may have run it. Registering (RPUSH) and taking
(LPOP) a pending replay are not idempotent: a second RPUSH leaves an entry no
replay consumes, which takes an unrelated identical publish for a replay (that
message is then not stored); a second LPOP takes another replay's entry. So both
run as scripts that leave a record of the call (a per-call token, in a key of the
registry key's cluster slot, kept ``CALL_RECORD_TTL_S``): a re-send finds it and
changes nothing (a re-sent take answers what the first run took). A registration
that fails anyway is undone with the same token (``_undo``), so that the caller's
retry, a new call, cannot leave the entries of its first try behind.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Sequence
from typing import Any

from redis.crc import key_slot

from storage.base import PENDING_REPLAY_TTL_S, REPLAY_MARK_TTL_S, StoreError
from storage.model import PendingReplay
from storage.redis.clients import OP_TIMEOUT_S
from storage.redis.keys import Cmd, Keys, fmt
from storage.redis.link import Link
from storage.redis.scripts import CLAIM_LUA, REGISTER_LUA, TAKE_LUA, UNDO_LUA

log = logging.getLogger(__name__)

# How long a call's record lives: longer than any re-send of it can come (redis-py
# re-sends within the call's own deadline, OP_TIMEOUT_S).
CALL_RECORD_TTL_S = int(6 * OP_TIMEOUT_S)


def _hash_part(key: bytes) -> bytes:
    """What Redis Cluster hashes of ``key``: its hash tag, else all of it."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return key


class Bookkeeping:
    def __init__(self, link: Link, keys: Keys) -> None:
        self._link, self._keys = link, keys
        self._calls = keys.calls
        self._tags: dict[int, bytes] = {}  # slot -> a searched hash tag (keys with "}")

    async def claim_replay(self, connection: str, highs: dict[str, float]) -> dict[str, float | None]:
        if not highs:
            return {}
        topics = list(highs)
        # a fresh claim id per call: a re-send of this same call gets the same answer
        args: list[Any] = ["EVAL", CLAIM_LUA, 1, self._keys.mark(connection), secrets.token_hex(8),
                           REPLAY_MARK_TTL_S]
        for t in topics:
            args += (t.encode(), fmt(float(highs[t])))
        res = await self._link.one(tuple(args), "claim_replay")
        return {t: (float(p) if p else None) for t, p in zip(topics, res, strict=True)}

    async def reset_replay_marks(self, connection: str) -> None:
        await self._link.one(("DEL", self._keys.mark(connection)), "reset_replay_marks")

    def call_record(self, key: bytes, call: bytes) -> bytes:
        """The record of one call on ``key``. In cluster mode a script may only touch
        keys of one slot: its hash tag is what ``key`` hashes to, or, when that cannot
        be a tag (a topic with a "}"), a tag searched once per slot (~16k hashes, ~8 ms)."""
        record = self._calls + b"{" + _hash_part(key) + b"}:" + call
        if not self._link.cluster:
            return record
        slot = key_slot(key)
        if key_slot(record) == slot:
            return record
        tag = self._tags.get(slot)
        if tag is None:
            n = 0
            while key_slot(self._calls + b"{%x}:" % n) != slot:
                n += 1
            tag = self._tags[slot] = b"%x" % n
        return self._calls + b"{" + tag + b"}:" + call

    def _registrations(self, items: Sequence[PendingReplay]) -> list[Cmd]:
        """One REGISTER_LUA per registry key (its ids in order), each with its record."""
        ids: dict[bytes, list[bytes]] = {}
        for item in items:
            ids.setdefault(self._keys.pend(item.topic.encode(), item.digest.encode()), []).append(item.msgid.encode())
        token = secrets.token_hex(8).encode()
        return [("EVAL", REGISTER_LUA, 2, key, self.call_record(key, b"%s:%d" % (token, i)),
                 PENDING_REPLAY_TTL_S, CALL_RECORD_TTL_S, *msgids)
                for i, (key, msgids) in enumerate(ids.items())]

    async def register_pending_replays(self, items: Sequence[PendingReplay]) -> None:
        cmds = self._registrations(items)
        try:
            await self._link.run(cmds, "register_pending_replays")
        except StoreError:
            await self._undo(cmds)
            raise

    async def _undo(self, cmds: list[Cmd]) -> None:
        """Remove what a failed registration may have added (it may have run before
        its reply was lost): the caller registers again, as a new call."""
        try:
            await self._link.run([("EVAL", UNDO_LUA, *cmd[2:]) for cmd in cmds], "register_pending_replays (undo)")
        except StoreError as exc:  # Redis is unreachable: the entries expire with their key
            log.warning("cannot undo a failed registration of %d pending replays (they expire within %d s): %s",
                        sum(len(cmd) - 7 for cmd in cmds), PENDING_REPLAY_TTL_S, exc)

    async def take_pending_replay(self, topic: str, digest: str) -> str | None:
        key = self._keys.pend(topic.encode(), digest.encode())
        record = self.call_record(key, secrets.token_hex(8).encode())
        raw = await self._link.one(("EVAL", TAKE_LUA, 2, key, record, CALL_RECORD_TTL_S), "take_pending_replay")
        return raw.decode() if raw else None
