"""Replay bookkeeping shared by every service instance through Redis: the replay
marks of a connection and the v2 pending-replay registry. (Tombstones of replay
acks are written with the ops they guard, in ``write.py``; so is the removal of
one registry entry, ``DropPendingReplay``.)"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any

from storage.base import PENDING_REPLAY_TTL_S, REPLAY_MARK_TTL_S
from storage.model import PendingReplay
from storage.redis.keys import Cmd, Keys, fmt
from storage.redis.link import Link
from storage.redis.scripts import CLAIM_LUA


class Bookkeeping:
    def __init__(self, link: Link, keys: Keys) -> None:
        self._link, self._keys = link, keys

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

    async def register_pending_replays(self, items: Sequence[PendingReplay]) -> None:
        cmds: list[Cmd] = []
        for item in items:
            key = self._keys.pend(item.topic.encode(), item.digest.encode())
            cmds += [("RPUSH", key, item.msgid.encode()), ("EXPIRE", key, PENDING_REPLAY_TTL_S)]
        await self._link.run(cmds, "register_pending_replays")

    async def take_pending_replay(self, topic: str, digest: str) -> str | None:
        raw = await self._link.one(("LPOP", self._keys.pend(topic.encode(), digest.encode())),
                                   "take_pending_replay")
        return raw.decode() if raw else None
