"""``RedisStore``: the ``Store`` interface over the parts of this package."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence

from storage.base import Store, WriteRejected
from storage.config import RedisConfig
from storage.model import PendingReplay, StoredMessage, Subscription, WriteOp
from storage.redis.bookkeeping import Bookkeeping
from storage.redis.keys import Keys
from storage.redis.link import Link
from storage.redis.ops import text
from storage.redis.permissions import check_permissions
from storage.redis.purge import Janitor
from storage.redis.reads import Reader
from storage.redis.rounds import Round, refusals
from storage.redis.write import Writer

log = logging.getLogger(__name__)


def _lookup(name: str) -> bytes:
    """A name to look up: text that is not UTF-8 was never stored (writes refuse it),
    so its surrogates are passed through and the lookup simply finds nothing."""
    return name.encode("utf-8", "surrogatepass")


class RedisStore(Store):
    name = "redis"

    def __init__(self, cfg: RedisConfig) -> None:
        self.cfg = cfg
        ttl = int(cfg.message_ttl)
        self._keys = keys = Keys.of(cfg)
        self._link = link = Link(cfg)
        self._janitor = Janitor(link, keys, ttl)
        self._reader = Reader(link, keys, ttl, self._janitor)
        self._writer = Writer(link, keys, cfg)
        self._bookkeeping = Bookkeeping(link, keys)

    async def open(self) -> None:
        await self._link.connect()
        try:
            await check_permissions(self._link, self._keys, wait=self.cfg.wait_replicas > 0 and not self._link.cluster)
        except BaseException:
            await self.close()
            raise
        cfg = self.cfg
        log.info("redis store open: %s, %s, message_ttl %d s, key prefixes %r / %r", self._link.where,
                 self._link.who, cfg.message_ttl, cfg.message_key_prefix, cfg.subscription_key_prefix)
        if cfg.wait_replicas > 0 and not self._link.cluster:
            await self._check_replicas()

    async def _check_replicas(self) -> None:
        """Say at start-up when fewer replicas answer than ``wait_replicas`` asks: every
        write then counts as failed (it waits in the spool) until enough of them do."""
        cfg = self.cfg
        replicas = int(await self._link.one(("WAIT", cfg.wait_replicas, cfg.wait_timeout_ms), "open (replicas)"))
        if replicas < cfg.wait_replicas:
            log.warning("redis.wait_replicas: %d replicas must confirm each write, but %d answered within "
                        "wait_timeout (%d ms): writes wait in the spool until enough replicas are connected",
                        cfg.wait_replicas, replicas, cfg.wait_timeout_ms,
                        extra={"event": "redis_replicas_short", "replicas": replicas})

    async def close(self) -> None:
        await self._link.close()

    async def ping(self) -> None:
        await self._link.one(("PING",), "ping")

    async def write(self, ops: Sequence[WriteOp]) -> None:
        await self._writer.write(ops)

    # -- subscriptions ---------------------------------------------------------------
    async def save_subscription(self, clientid: str, topic: str, qos: int) -> None:
        if qos not in (0, 1, 2):
            raise WriteRejected("out_of_range", f"redis: subscription qos {qos} is not 0, 1 or 2")
        rnd = Round("save_subscription")
        rnd.add(0, "HSET", self._keys.subscription(text(clientid, "clientid", None)),
                text(topic, "topic filter", None), qos)
        await self._link.send(rnd)
        for reason, detail in refusals(rnd).values():  # the clientid's key holds another type
            raise WriteRejected(reason, detail)

    async def delete_subscription(self, clientid: str, topic: str) -> None:
        key = self._keys.subscription(_lookup(clientid))
        await self._link.one(("HDEL", key, _lookup(topic)), "delete_subscription")

    async def subscriptions(self, clientid: str) -> list[Subscription]:
        raw = await self._link.one(("HGETALL", self._keys.subscription(_lookup(clientid))), "subscriptions")
        return _subscriptions(clientid, raw)

    async def fresh_session_subscriptions(self, clientid: str, connection: str) -> list[Subscription]:
        # one round trip (in cluster mode, one per node the two keys live on)
        cmds = [("HGETALL", self._keys.subscription(_lookup(clientid))), ("DEL", self._keys.mark(connection))]
        raw, _ = await self._link.run(cmds, "fresh_session_subscriptions")
        return _subscriptions(clientid, raw)

    # -- replay reads ------------------------------------------------------------------
    async def stored_topics(self, pattern_prefix: str) -> list[str]:
        return await self._reader.stored_topics(pattern_prefix)

    async def latest_positions(self, topics: Sequence[str]) -> dict[str, float]:
        return await self._reader.latest_positions(topics)

    def read_messages(
        self, ranges: dict[str, tuple[float | None, float]], page_size: int
    ) -> AsyncIterator[list[StoredMessage]]:
        return self._reader.read_messages(ranges, page_size)

    async def count_messages(self, topics: Sequence[str]) -> dict[str, int]:
        return await self._reader.count_messages(topics)

    # -- replay bookkeeping --------------------------------------------------------------
    async def claim_replay(self, connection: str, highs: dict[str, float]) -> dict[str, float | None]:
        return await self._bookkeeping.claim_replay(connection, highs)

    async def reset_replay_marks(self, connection: str) -> None:
        await self._bookkeeping.reset_replay_marks(connection)

    async def register_pending_replays(self, items: Sequence[PendingReplay]) -> None:
        await self._bookkeeping.register_pending_replays(items)

    async def take_pending_replay(self, topic: str, digest: str) -> str | None:
        return await self._bookkeeping.take_pending_replay(topic, digest)

    # -- maintenance ----------------------------------------------------------------------
    async def purge_expired(self, limit: int) -> int:
        return await self._janitor.purge_expired(limit)

    async def rebuild_topic_index(self) -> int:
        """Add every topic zset under ``{mp}:`` to the topic index (after migrating a
        store the Erlang plugin wrote; see purge.py)."""
        return await self._janitor.rebuild_topic_index()


def _subscriptions(clientid: str, raw: dict[bytes, bytes] | None) -> list[Subscription]:
    """The entries of a client's subscription hash (a bad one is left out, logged)."""
    out = []
    for topic, qos in (raw or {}).items():
        try:
            out.append(Subscription(topic.decode(), int(qos)))
        except (UnicodeDecodeError, ValueError):
            log.warning("redis: ignoring a bad subscription entry of %r", clientid)
    return out
