"""Redis backend (single, sentinel, cluster) in the key layout of the Erlang plugin.

Layout (``emqx_offline_messages`` 2.0.0 = emqx/emqx-offline-message-plugin
``009922bad5836dc97caf216ea0a0bf8e6f5c0a39`` = emqx/emqx
``5db93903ccdccbb3c671500a2b55045d8d8a60f4`` ``plugins/emqx_offline_messages``;
see docs/plugin-2.0.0-notes.md)::

    {mp}:{b62id}    hash  id=b62id from qos topic payload(raw bytes) ts(ms) retain=true|false
                          EXPIRE message_ttl (none when message_ttl = 0)
    {mp}:{topic}    zset  member = b62id, score = arrival time in ms (a float)
    {sp}:{clientid} hash  topic -> qos

    mp = message_key_prefix, sp = subscription_key_prefix, b62id = storage.base62.msgid_to_b62

Score (= ``StoredMessage.position``). The plugin 2.0.0 scores a message with its
arrival time in milliseconds as a float (``system_time(native)`` / native units per
ms), trims ``ZREMRANGEBYSCORE {mp}:{topic} -inf (now_ms - ttl*1000)`` on every
publish and, reading, keeps members whose score is ``> now_ms - ttl*1000`` (the
score is parsed as a float, or as an integer). Plugin versions before 2.0.0 scored
with the *expiry* time (``now + ttl``, integer); 2.0.0 does not, and neither do we.
Our score is the same clock, finer: the broker GUID's first 64 bits are its
creation time in microseconds, so the score is ``guid_us / 1000`` (distinct and
publish-ordered within a millisecond); a GUID more than a day away from our clock
falls back to our own time. Ties (equal scores) are read in GUID order.
``message_ttl = 0`` (keep until acknowledged): no EXPIRE, no trimming, the score
rule is unchanged, so a plugin configured with a ttl T reading the same store sees
the messages younger than T, and our reader sees all of them.

Keys of this service (never in the plugin's ``{mp}:`` namespace, which any topic
may take; ``{mp}~ox:`` is also outside a ``KEYS {mp}:*`` listing)::

    {mp}~ox:topics              zset, score 0, member = topic with stored messages
                                (``ZRANGE ... BYLEX`` on a literal prefix: wildcard replays)
    {mp}~ox:mark:{connection}   hash topic -> replay mark, EXPIRE REPLAY_MARK_TTL_S
    {mp}~ox:tomb:{b62id}        string, EX TOMBSTONE_TTL_S (ack of a replay)
    {mp}~ox:pend:{digest}:{topic} list of hex ids, EXPIRE PENDING_REPLAY_TTL_S (v2 replays)

Commands. The plugin uses HSET HDEL HGETALL HMSET DEL EXPIRE ZADD ZRANGE
ZREMRANGEBYSCORE ZREM (we write with HSET, not HMSET: the same fields, HSET takes
several since Redis 4). On top of them:

    PING     open() and ping(): liveness
    ZRANGE   (already the plugin's) with BYSCORE/REV/LIMIT/WITHSCORES for paged reads
             and the newest position, with BYLEX for the topic index (Redis >= 6.2)
    ZSCORE   re-key: read the position of the replayed message
    PTTL     re-key: read the remaining TTL of the replayed message ...
    PEXPIRE  ... and give it to the new copy
    EXISTS   re-key: is there a tombstone; topic index clean-up: is a topic's zset gone
    SET      tombstone of a replay's ack (SET key 1 EX n)
    RPUSH    v2 pending-replay registry: register ...
    LPOP     ... and take atomically
    EVAL     claim_replay (one key: read-compare-raise the marks atomically), and in
             single/sentinel mode the conditional removal of a topic from the topic
             index (two keys); scripts run HGET HSET EXPIRE EXISTS ZREM
    HGET     inside the claim_replay script
    SELECT   only when database != 0 (single, sentinel)
    CLUSTER SLOTS  cluster mode only: slot map discovery (redis-py would also send
             ``COMMAND`` to learn key positions; every keyed command here has its key
             first, so the store routes without it)
    SCAN     only ``rebuild_topic_index()`` (a one-off migration tool, not checked at open)
    ZCOUNT   only ``count_messages()`` (operator CLI, not checked at open); a user
             the ACL refuses it counts with paged ZRANGE BYSCORE instead

docs/redis-acl.md has a ready ``ACL SETUSER`` line. ``open()`` runs every command
above on throwaway keys of each key family and names what the user may not run.

Connections. single: one pool of ``pool_size`` connections; sentinel:
``Sentinel.master_for`` (follows a failover: a connection to a demoted master is
dropped and the next one asks the sentinels again; sentinel nodes get the TLS
settings and no credentials, as in the plugin 2.0.0, unless one answers NOAUTH);
cluster: ``RedisCluster`` with ``pool_size`` connections per node, ``database``
ignored with a warning. TLS (``ssl { }``) applies to every connection, sentinels
included: our SSL context (CA, client certificate, verify) and
``server_name_indication`` as SNI and the name to verify ("disable": no SNI, no
name check). At most ``pool_size`` operations run at once (a semaphore), so no
pool ever needs more than ``pool_size`` connections per server. Every round trip
has one deadline (``_OP_TIMEOUT_S``) instead of redis-py's per-reply socket
timeout, and commands are serialised by hiredis: with both, a pipelined save costs
~15 us of CPU (batches of 100, 300-byte payloads, ~45k saves/s on one connection
of the 2-core dev machine; ~8.7k/s one save per round trip). Failures raise
``StoreError`` (``StoreConfigError`` for authentication and ACL refusals).

Write path. ``write(ops)`` runs in phases, one pipeline round trip each, phases
only when needed:

    A  (if re-keys) HGETALL / PTTL / ZSCORE of each re-keyed message;
       in cluster mode also the tombstones of replay acks
    B  hashes: HSET+EXPIRE (save), [SET tombstone] DEL (delete), HSET+PEXPIRE (new copy)
    C  indexes: ZADD (save), ZREM (delete), ZADD new + ZREM old (re-key),
       then ZREMRANGEBYSCORE per topic (trimming, as the plugin)
    D  ZADD {mp}~ox:topics (saved topics), DEL old hash + EXISTS tombstone (re-key)
    E  (if a tombstone was found) DEL + ZREM of the new copy

In single/sentinel mode B, C and D are one pipeline on one connection, executed in
order: a batch of saves is ONE round trip. In cluster mode keys live on different
nodes and redis-py's cluster pipeline runs each node's share concurrently, so
B, C, D are separate round trips where cross-key order matters: a hash exists
before its index member (a reader never mistakes a message being written for a
dangling member and removes it), an index member exists before its topic is
(re-)added to the topic index (see below), a tombstone exists before the delete
it guards, a new copy exists before the tombstone check. Every op is idempotent;
a re-key whose old message is gone still checks the tombstone (a retried batch).

Topic index clean-up. A topic leaves ``{mp}~ox:topics`` only when its zset has no
member left, and only during clean-up (``stored_topics`` finding a topic without
live messages, ``purge_expired``), never on the write path. A publish adds the
index member first, then the topic. Single/sentinel: one script checks ``EXISTS``
and ``ZREM``s atomically. Cluster (keys on different nodes, no script): ``ZREM``
the topic, then ``EXISTS`` its zset again and re-add the topic if a publish came in
between; a concurrent wildcard discovery may miss that topic for that one round
trip, but it is never lost. Topics stored by the Erlang plugin itself are not in
the index: run ``rebuild_topic_index()`` once after a migration (exact-topic
replays read a plugin-written store without it).

Reads. ``read_messages`` keeps one cursor per topic (``ZRANGE key (low high BYSCORE
LIMIT 0 n WITHSCORES``, n = page_size shared over the topics, at least 4), merges
the cursors' heads in a heap by (score, GUID) and loads each page's hashes with one
pipelined HGETALL round trip: memory stays at about two pages however many
messages match. A page that ends inside a run of equal scores is re-read from that
score, so ties come out complete and in GUID order. Expired members (score <= now
- ttl) are not read; members whose hash is gone are skipped and ZREMed.

Limits. A position comes from the broker's clock: a message whose write reaches
Redis after a replay claim of a later position (e.g. stuck in a retried batch) is
not replayed again on that same connection (it stays stored for the next one). A
re-key racing an ack of the *old* id may leave the moved copy stored (replayed once
more later, never lost).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import secrets
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import hiredis
from redis._parsers.commands import AsyncCommandsParser
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import Connection, ConnectionPool, SSLConnection
from redis.asyncio.sentinel import Sentinel, SentinelManagedConnection
from redis.backoff import ExponentialBackoff
from redis.exceptions import (
    AuthenticationError,
    AuthenticationWrongNumberOfArgsError,
    DataError,
    NoPermissionError,
    RedisClusterException,
    RedisError,
    ResponseError,
)
from redis.retry import Retry

from storage.base import (
    PENDING_REPLAY_TTL_S,
    REPLAY_MARK_TTL_S,
    TOMBSTONE_TTL_S,
    Store,
    StoreConfigError,
    StoreError,
)
from storage.base62 import Base62Error, b62_to_msgid, msgid_to_b62
from storage.config import RedisConfig
from storage.model import (
    DeleteMessage,
    PendingReplay,
    RekeyMessage,
    SaveMessage,
    StoredMessage,
    Subscription,
    WriteOp,
)
from storage.tls import TlsSetupError, client_context

log = logging.getLogger(__name__)

__all__ = ["REDIS_COMMANDS", "RedisStore"]

# Every command the service sends (see the module docstring).
REDIS_COMMANDS: tuple[str, ...] = (
    "HSET", "HDEL", "HGETALL", "DEL", "EXPIRE", "ZADD", "ZRANGE", "ZREMRANGEBYSCORE", "ZREM",
    "PING", "ZSCORE", "PTTL", "PEXPIRE", "EXISTS", "SET", "RPUSH", "LPOP", "EVAL", "HGET",
)

_OP_TIMEOUT_S = 10.0  # one round trip (a pipeline or a command), connecting included
_CONNECT_TIMEOUT_S = 5.0
_GUID_SKEW_MS = 24 * 3600 * 1000.0  # a GUID timestamp further from our clock is not trusted
_TOPIC_PAGE = 1000  # topics per ZRANGE BYLEX page
_MIN_FETCH = 4  # members fetched per topic cursor at least
_COUNT_PAGE = 10000  # members per ZRANGE when counting without ZCOUNT

_F_ID, _F_FROM, _F_QOS, _F_TOPIC = b"id", b"from", b"qos", b"topic"
_F_PAYLOAD, _F_TS, _F_RETAIN = b"payload", b"ts", b"retain"
_TRUE, _FALSE = b"true", b"false"

# Tie-break of equal scores: the b62 id with its symbols mapped to their 6-bit
# values' order sorts like the GUID (GUIDs of one score share their first 64 bits,
# so their decimal texts have the same length).
_B62_ORDER = bytes.maketrans(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789",
    bytes(range(0x40, 0x40 + 62)),
)

# claim_replay: KEYS[1] = mark hash; ARGV = claim id, ttl, topic1, high1, ...
# Returns the previous marks ("" = none). A retry of the same call (same claim id,
# e.g. redis-py re-sending after a lost reply) gets the same answer again.
_CLAIM_LUA = """
local key = KEYS[1]
if redis.call('HGET', key, '\\0claim') == ARGV[1] then
  local prev = redis.call('HGET', key, '\\0prev')
  if prev then return cjson.decode(prev) end
end
local out = {}
for i = 3, #ARGV, 2 do
  local prev = redis.call('HGET', key, ARGV[i])
  if prev and tonumber(prev) >= tonumber(ARGV[i + 1]) then
    out[#out + 1] = prev
  else
    out[#out + 1] = prev or ''
    redis.call('HSET', key, ARGV[i], ARGV[i + 1])
  end
end
redis.call('HSET', key, '\\0claim', ARGV[1], '\\0prev', cjson.encode(out))
redis.call('EXPIRE', key, ARGV[2])
return out
"""

# KEYS[1] = a topic's zset, KEYS[2] = topic index, ARGV[1] = topic
_REMOVE_TOPIC_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.call('ZREM', KEYS[2], ARGV[1])
end
return 0
"""

Cmd = tuple[Any, ...]


def _fmt(score: float) -> bytes:
    """A score as Redis parses it back to the same double."""
    return repr(score).encode()


def _wrap(exc: BaseException, what: str) -> StoreError:
    if isinstance(exc, NoPermissionError):
        return StoreConfigError(f"redis {what}: permission denied: {exc}")
    if isinstance(exc, AuthenticationError):
        return StoreConfigError(f"redis {what}: authentication failed: {exc}")
    return StoreError(f"redis {what}: {type(exc).__name__}: {exc}")


_ERRORS = (RedisError, RedisClusterException, OSError, asyncio.TimeoutError)


# ---------------------------------------------------------------------------
# TLS connections (custom context + server_name_indication)
# ---------------------------------------------------------------------------


def _pack(args: tuple[Any, ...]) -> bytes:
    first = args[0]
    if isinstance(first, str):
        first = first.encode()
    if b" " in first:  # redis-py sends e.g. "CLUSTER SLOTS" as one argument
        args = (*first.split(), *args[1:])
    try:
        return bytes(hiredis.pack_command(args))
    except TypeError as exc:
        raise DataError(str(exc)) from None


class _HiredisPack:
    """Serialise commands with hiredis (C) instead of redis-py's pure-Python asyncio
    packer (which the sync client already avoids): most of a pipelined save's cost."""

    def pack_command(self, *args: Any) -> list[bytes]:
        return [_pack(args)]

    def pack_commands(self, commands: Iterable[Iterable[Any]]) -> list[bytes]:
        return [b"".join([_pack(tuple(cmd)) for cmd in commands])]


class _FastConnection(_HiredisPack, Connection):
    pass


class _SentinelConnection(_HiredisPack, SentinelManagedConnection):
    pass


class _FirstArgKey(AsyncCommandsParser):
    """Cluster routing without ``COMMAND``: redis-py's cluster client learns where
    every command has its keys from ``COMMAND`` (one more command to grant), but
    every keyed command this store sends has exactly its routing key first (EVAL
    is routed by redis-py itself, PING/CLUSTER/SCAN go to nodes, not slots)."""

    async def initialize(self, node: ClusterNode | None = None) -> None:
        if node is not None:
            self.node = node

    async def get_keys(self, *args: Any) -> tuple[Any, ...] | None:
        return (args[1],) if len(args) >= 2 else None


class _TlsConnection(_HiredisPack, SSLConnection):
    """redis-py's SSL connection with our context (which also carries the SNI name)."""

    def __init__(self, *, ox_tls: ssl.SSLContext, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ssl_context.context = ox_tls


class _SentinelTlsConnection(SentinelManagedConnection, _TlsConnection):
    pass


def _tls_of(cfg: RedisConfig) -> ssl.SSLContext | None:
    if not cfg.ssl.enable:
        return None
    try:
        return client_context(cfg.ssl, "redis.ssl")
    except TlsSetupError as exc:
        raise StoreConfigError(str(exc)) from None


# ---------------------------------------------------------------------------
# read cursors
# ---------------------------------------------------------------------------


class _Cursor:
    """Position of one topic's paged read: members with ``low < score <= high``."""

    __slots__ = ("buf", "done", "high", "index", "key", "low", "topic")

    def __init__(self, index: int, topic: str, key: bytes, low: bytes, high: bytes) -> None:
        self.index = index
        self.topic = topic
        self.key = key
        self.low = low  # ZRANGE BYSCORE min: b"-inf", b"(x" or b"x" (re-read ties at x)
        self.high = high
        self.buf: deque[tuple[float, bytes, bytes]] = deque()  # (score, tie-break, member)
        self.done = False


def _pairs(reply: Sequence[Any]) -> list[tuple[bytes, float]]:
    """A ``ZRANGE ... WITHSCORES`` reply: redis-py 8 pairs it up ([member, score]),
    older versions and RESP2 without the callback give a flat list."""
    if reply and isinstance(reply[0], (list, tuple)):
        return [(m, float(s)) for m, s in reply]
    return [(reply[i], float(reply[i + 1])) for i in range(0, len(reply) - 1, 2)]


# ---------------------------------------------------------------------------
# the store
# ---------------------------------------------------------------------------


class RedisStore(Store):
    name = "redis"

    def __init__(self, cfg: RedisConfig) -> None:
        self.cfg = cfg
        self._ttl = int(cfg.message_ttl)
        self._cluster = cfg.redis_type == "cluster"
        self._mp = f"{cfg.message_key_prefix}:".encode()
        self._sp = f"{cfg.subscription_key_prefix}:".encode()
        self._xp = f"{cfg.message_key_prefix}~ox:".encode()
        self._topics_key = self._xp + b"topics"
        self._tomb = self._xp + b"tomb:"
        self._mark = self._xp + b"mark:"
        self._pend = self._xp + b"pend:"
        self._sem = asyncio.Semaphore(max(1, cfg.pool_size))
        self._client: Redis | RedisCluster | None = None
        self._sentinel: Sentinel | None = None
        self._purge_from = b"-"
        # WAIT for replicas on the write pipeline (single/sentinel): a message is then
        # answered as stored only once a replica has it, so a failover keeps it.
        self._wait: Cmd | None = (
            ("WAIT", cfg.wait_replicas, cfg.wait_timeout_ms)
            if cfg.wait_replicas > 0 and not self._cluster else None
        )
        self._wait_short = 0

    # -- connection -------------------------------------------------------------
    def _base_kwargs(self) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "username": cfg.username or None,
            "password": cfg.password or None,
            # no per-reply read timer (redis-py arms one per reply of a pipeline, a third of
            # a save's cost): every round trip runs under one asyncio.timeout instead, and
            # redis-py drops a connection whose read was cancelled
            "socket_timeout": None,
            "socket_connect_timeout": _CONNECT_TIMEOUT_S,
            "driver_info": None,  # no CLIENT SETINFO (not in Redis < 7.2, one command less)
            "retry": Retry(ExponentialBackoff(cap=1.0, base=0.05), 2),
            "decode_responses": False,
        }

    def _servers_text(self) -> str:
        return ",".join(str(s) for s in self.cfg.servers)

    def _node_client(self, host: str, port: int, tls: ssl.SSLContext | None, *, db: int = 0, max_connections: int = 4,
                     with_auth: bool = True) -> Redis:
        kwargs = self._base_kwargs()
        if not with_auth:
            kwargs.update(username=None, password=None)
        kwargs.update(host=host, port=port, db=db, max_connections=max_connections)
        if tls is not None:
            kwargs.update(connection_class=_TlsConnection, ox_tls=tls)
        else:
            kwargs["connection_class"] = _FastConnection
        return Redis.from_pool(ConnectionPool(**kwargs))

    def _build_single(self, tls: ssl.SSLContext | None) -> Redis:
        server = self.cfg.servers[0]
        return self._node_client(server.host, server.port, tls, db=self.cfg.database,
                                 max_connections=self.cfg.pool_size)

    def _sentinel_clients(self, tls: ssl.SSLContext | None, with_auth: bool) -> list[Redis]:
        # every new master connection asks a sentinel first: as many as the master pool
        size = max(4, self.cfg.pool_size)
        return [self._node_client(s.host, s.port, tls, with_auth=with_auth, max_connections=size)
                for s in self.cfg.servers]

    async def _sentinels_need_auth(self, tls: ssl.SSLContext | None) -> bool:
        """Sentinels usually run without a password (the plugin 2.0.0 sends none);
        use the data nodes' credentials only if a sentinel asks for them."""
        if not (self.cfg.username or self.cfg.password):
            return False
        for client in self._sentinel_clients(tls, with_auth=False):
            try:
                async with asyncio.timeout(_OP_TIMEOUT_S):
                    await client.execute_command("PING")  # type: ignore[no-untyped-call]
                return False
            except AuthenticationError:
                return True
            except ResponseError as exc:
                if "NOAUTH" in str(exc) or "NOPERM" in str(exc):
                    return True
            except _ERRORS:
                continue
            finally:
                await client.aclose()
        return False

    async def _build_sentinel(self, tls: ssl.SSLContext | None) -> Redis:
        sentinel = Sentinel([], sentinel_kwargs={})  # type: ignore[no-untyped-call]
        sentinel.sentinels = self._sentinel_clients(tls, await self._sentinels_need_auth(tls))
        self._sentinel = sentinel
        kwargs = self._base_kwargs()
        kwargs.update(db=self.cfg.database, max_connections=self.cfg.pool_size)
        if tls is not None:
            kwargs.update(connection_class=_SentinelTlsConnection, ox_tls=tls)
        else:
            kwargs["connection_class"] = _SentinelConnection
        client: Redis = sentinel.master_for(self.cfg.sentinel, **kwargs)
        return client

    def _build_cluster(self, tls: ssl.SSLContext | None) -> RedisCluster:
        kwargs = self._base_kwargs()
        kwargs.pop("retry")
        nodes = [ClusterNode(s.host, s.port) for s in self.cfg.servers]
        client = RedisCluster(startup_nodes=nodes, max_connections=self.cfg.pool_size, **kwargs)
        client.commands_parser = _FirstArgKey()
        # RedisCluster takes no connection class: set ours (hiredis packing; for TLS our
        # context with CA, client certificate, verify and the SNI name) in the
        # connection_kwargs dict that every node, also those learnt later, is built from.
        conn_class: type[Connection] = _FastConnection if tls is None else _TlsConnection
        client.connection_kwargs["connection_class"] = conn_class
        if tls is not None:
            client.connection_kwargs["ox_tls"] = tls
        for node in client.startup_nodes:
            node.connection_class = conn_class
            if tls is not None:
                node.connection_kwargs["ox_tls"] = tls
        return client

    async def open(self) -> None:
        cfg = self.cfg
        tls = _tls_of(cfg)
        who = f"user {cfg.username!r}" if cfg.username else "default user"
        where = f"{cfg.redis_type} {self._servers_text()}"
        if self._cluster and cfg.database != 0:
            log.warning("redis.database = %d is ignored in cluster mode (cluster has database 0 only)",
                        cfg.database)
        try:
            if cfg.redis_type == "single":
                self._client = self._build_single(tls)
            elif cfg.redis_type == "sentinel":
                self._client = await self._build_sentinel(tls)
            else:
                self._client = self._build_cluster(tls)
            async with asyncio.timeout(_OP_TIMEOUT_S):
                await self._client.execute_command("PING")
        except (AuthenticationError, AuthenticationWrongNumberOfArgsError) as exc:
            await self.close()
            raise StoreConfigError(f"redis ({where}): authentication failed for {who}: {exc}") from None
        except NoPermissionError as exc:
            await self.close()
            raise StoreConfigError(f"redis ({where}): {who} may not connect: {exc}") from None
        except ResponseError as exc:
            await self.close()
            text = str(exc)
            if "DB index" in text:
                raise StoreConfigError(f"redis ({where}): database {cfg.database}: {text}") from None
            raise StoreConfigError(f"redis ({where}): {text}") from None
        except _ERRORS as exc:
            await self.close()
            if self._cluster and isinstance(exc, RedisClusterException):
                # redis-py reports a refused CLUSTER SLOTS as "cluster mode is not enabled"
                await self._diagnose_cluster(tls, who, where)
            raise StoreError(f"redis ({where}): cannot connect: {type(exc).__name__}: {exc}") from None
        try:
            await self._check_permissions(who, where)
        except BaseException:
            await self.close()
            raise
        log.info("redis store open: %s, %s, message_ttl %d s, key prefixes %r / %r",
                 where, who, self._ttl, cfg.message_key_prefix, cfg.subscription_key_prefix)

    async def _diagnose_cluster(self, tls: ssl.SSLContext | None, who: str, where: str) -> None:
        """Ask the configured nodes for CLUSTER SLOTS directly; raise StoreConfigError
        with the reason if one of them answers why the cluster cannot be used."""
        for server in self.cfg.servers:
            client = self._node_client(server.host, server.port, tls)
            try:
                async with asyncio.timeout(_OP_TIMEOUT_S):
                    await client.execute_command("CLUSTER", "SLOTS")  # type: ignore[no-untyped-call]
            except NoPermissionError:
                raise StoreConfigError(
                    f"redis ({where}): {who} may not run CLUSTER SLOTS (the commands the service needs "
                    "are in docs/redis-acl.md)") from None
            except (AuthenticationError, AuthenticationWrongNumberOfArgsError) as exc:
                raise StoreConfigError(f"redis ({where}): authentication failed for {who}: {exc}") from None
            except ResponseError as exc:
                if "cluster" in str(exc).lower():
                    raise StoreConfigError(
                        f"redis ({where}): {server} is not a cluster node ({exc}); check redis_type") from None
            except _ERRORS:
                continue
            finally:
                await client.aclose()

    async def _check_permissions(self, who: str, where: str) -> None:
        """Run every command the service uses on throwaway keys of each key family."""
        tag = b"~ox-probe-" + secrets.token_hex(6).encode()
        mh, mz, sh = self._mp + tag, self._mp + tag + b"-z", self._sp + tag
        xs, xl = self._xp + b"probe:" + tag, self._xp + b"probe:" + tag + b":l"
        xh, xz = self._xp + b"probe:" + tag + b":h", self._xp + b"probe:" + tag + b":z"
        families = {mh: f"{self.cfg.message_key_prefix}:*", mz: f"{self.cfg.message_key_prefix}:*",
                    sh: f"{self.cfg.subscription_key_prefix}:*"}
        ours = f"{self.cfg.message_key_prefix}~ox:*"
        probes: list[tuple[str, Cmd]] = [
            ("HSET", ("HSET", mh, b"f", b"v")), ("EXPIRE", ("EXPIRE", mh, 60)),
            ("PEXPIRE", ("PEXPIRE", mh, 60000)), ("PTTL", ("PTTL", mh)), ("HGETALL", ("HGETALL", mh)),
            ("ZADD", ("ZADD", mz, 1, b"m")), ("EXPIRE", ("EXPIRE", mz, 60)),
            ("ZRANGE", ("ZRANGE", mz, b"-inf", b"+inf", b"BYSCORE", b"LIMIT", 0, 1, b"WITHSCORES")),
            ("ZSCORE", ("ZSCORE", mz, b"m")), ("ZREMRANGEBYSCORE", ("ZREMRANGEBYSCORE", mz, b"-inf", 0)),
            ("ZREM", ("ZREM", mz, b"m")), ("EXISTS", ("EXISTS", mz)),
            ("HSET", ("HSET", sh, b"t", 1)), ("EXPIRE", ("EXPIRE", sh, 60)), ("HGETALL", ("HGETALL", sh)),
            ("HDEL", ("HDEL", sh, b"t")),
            ("SET", ("SET", xs, 1, b"EX", 60)), ("EXISTS", ("EXISTS", xs)),
            ("RPUSH", ("RPUSH", xl, b"x")), ("EXPIRE", ("EXPIRE", xl, 60)), ("LPOP", ("LPOP", xl)),
            ("ZADD", ("ZADD", xz, 0, b"t")), ("EXPIRE", ("EXPIRE", xz, 60)),
            ("ZRANGE", ("ZRANGE", xz, b"[t", b"[t\xff", b"BYLEX", b"LIMIT", 0, 1)),
            ("HSET", ("HSET", xh, b"t", b"1")), ("EXPIRE", ("EXPIRE", xh, 60)), ("HGET", ("HGET", xh, b"t")),
            ("EVAL", ("EVAL", _CLAIM_LUA, 1, xh, b"probe", 60, b"t", b"1")),
        ]
        if not self._cluster:
            probes.append(("EVAL", ("EVAL", _REMOVE_TOPIC_LUA, 2, mz, xz, b"t")))
        if self._wait is not None:
            probes.append(("WAIT", ("WAIT", 0, 1)))
        probes.append(("ZREM", ("ZREM", xz, b"t")))
        for key in (mh, mz, sh, xs, xl, xh, xz):
            probes.append(("DEL", ("DEL", key)))
        missing: list[str] = []
        denied_keys: list[str] = []
        assert self._client is not None
        for name, cmd in probes:
            try:
                async with asyncio.timeout(_OP_TIMEOUT_S):
                    await self._client.execute_command(*cmd)
            except NoPermissionError as exc:
                if "key" in str(exc).lower():
                    family = families.get(cmd[1], ours) if len(cmd) > 1 else ours
                    if family not in denied_keys:
                        denied_keys.append(family)
                elif name not in missing:
                    missing.append(name)
            except ResponseError as exc:
                if "can't run this command" in str(exc):  # inside a script
                    label = f"{name} (its scripts use HGET, HSET, EXPIRE, EXISTS, ZREM)"
                    if label not in missing:
                        missing.append(label)
                else:
                    raise StoreConfigError(f"redis ({where}): {name} failed: {exc}") from None
            except _ERRORS as exc:
                raise _wrap(exc, f"({where}) permission check") from None
        if missing or denied_keys:
            parts = []
            if missing:
                parts.append("may not run " + ", ".join(missing))
            if denied_keys:
                parts.append("may not access keys " + ", ".join(denied_keys))
            raise StoreConfigError(
                f"redis ({where}): {who} {'; '.join(parts)} (the commands and key patterns the service "
                "needs are in docs/redis-acl.md)"
            )

    async def close(self) -> None:
        client, self._client = self._client, None
        sentinel, self._sentinel = self._sentinel, None
        if client is not None:
            try:
                await client.aclose()
            except _ERRORS as exc:
                log.debug("redis close: %s", exc)
        if sentinel is not None:
            for node in sentinel.sentinels:
                try:
                    await node.aclose()
                except _ERRORS as exc:
                    log.debug("redis sentinel close: %s", exc)

    def _c(self) -> Redis | RedisCluster:
        if self._client is None:
            raise StoreError("redis store is not open")
        return self._client

    async def _run(self, cmds: Sequence[Cmd], what: str) -> list[Any]:
        """One pipeline round trip (no MULTI); raises StoreError on any error."""
        if not cmds:
            return []
        client = self._c()
        try:
            async with self._sem, asyncio.timeout(_OP_TIMEOUT_S):
                pipe = client.pipeline(transaction=False)
                for cmd in cmds:
                    pipe.execute_command(*cmd)
                return list(await pipe.execute(raise_on_error=True))
        except _ERRORS as exc:
            raise _wrap(exc, what) from None

    async def _one(self, cmd: Cmd, what: str) -> Any:
        client = self._c()
        try:
            async with self._sem, asyncio.timeout(_OP_TIMEOUT_S):
                return await client.execute_command(*cmd)
        except _ERRORS as exc:
            raise _wrap(exc, what) from None

    async def ping(self) -> None:
        await self._one(("PING",), "ping")

    # -- keys ----------------------------------------------------------------------
    def _idx(self, topic: str) -> bytes:
        return self._mp + topic.encode()

    # -- write path --------------------------------------------------------------------
    async def write(self, ops: Sequence[WriteOp]) -> None:
        if not ops:
            return
        now_ms = time.time() * 1000.0
        mp, ttl, cluster = self._mp, self._ttl, self._cluster
        tombs: list[Cmd] = []  # phase A (cluster)
        reads: list[Cmd] = []  # phase A
        hashes: list[Cmd] = []  # phase B
        index: list[Cmd] = []  # phase C
        post: list[Cmd] = []  # phase D
        checks: list[Cmd] = []  # phase D, last: EXISTS tombstone per re-key
        rekeys: list[tuple[RekeyMessage, bytes, bytes, bytes, bytes]] = []
        saved_topics: dict[bytes, None] = {}
        for op in ops:
            try:
                if type(op) is SaveMessage:
                    msg = op.message
                    b62 = msgid_to_b62(msg.msgid).encode()
                    key = mp + b62
                    topic = msg.topic.encode()
                    hashes.append((
                        "HSET", key, _F_ID, b62, _F_FROM, msg.sender, _F_QOS, msg.qos, _F_TOPIC, topic,
                        _F_PAYLOAD, msg.payload, _F_TS, msg.timestamp, _F_RETAIN, _TRUE if msg.retain else _FALSE,
                    ))
                    if ttl > 0:
                        hashes.append(("EXPIRE", key, ttl))
                    index.append(("ZADD", mp + topic, _fmt(_score(msg.msgid, now_ms)), b62))
                    saved_topics[topic] = None
                elif type(op) is DeleteMessage:
                    b62 = msgid_to_b62(op.msgid).encode()
                    if op.replay_ack:
                        (tombs if cluster else hashes).append(("SET", self._tomb + b62, 1, b"EX", TOMBSTONE_TTL_S))
                    hashes.append(("DEL", mp + b62))
                    index.append(("ZREM", self._idx(op.topic), b62))
                elif type(op) is RekeyMessage:
                    if op.old_id.upper() == op.new_id.upper():
                        continue
                    old = msgid_to_b62(op.old_id).encode()
                    new = msgid_to_b62(op.new_id).encode()
                    idx = self._idx(op.topic)
                    rekeys.append((op, old, new, idx, self._tomb + new))
                    reads += [("HGETALL", mp + old), ("PTTL", mp + old), ("ZSCORE", idx, old)]
                else:  # pragma: no cover - the WriteOp union is closed
                    raise TypeError(f"unknown write op {op!r}")
            except Base62Error as exc:  # not a broker GUID: nothing the plugin layout can hold
                log.warning("redis: skipping %s with an invalid message id: %s", type(op).__name__, exc)

        if ttl > 0 and saved_topics:
            deadline = _fmt(now_ms - ttl * 1000.0)
            index += [("ZREMRANGEBYSCORE", mp + t, b"-inf", deadline) for t in saved_topics]
        if saved_topics:
            args: list[Any] = ["ZADD", self._topics_key]
            for t in saved_topics:
                args += (0, t)
            post.append(tuple(args))
        pre_res = await self._run(tombs + reads, "write (read phase)") if tombs or reads else []
        targets: list[tuple[bytes, bytes]] = []  # (new id, topic zset) per tombstone check
        if rekeys:
            base = len(tombs)
            for i, (_op, old, new, idx, tomb) in enumerate(rekeys):
                fields, pttl, score = pre_res[base + 3 * i: base + 3 * i + 3]
                if fields and score is not None and pttl != -2:
                    args = ["HSET", mp + new]
                    for k, v in fields.items():
                        args += (k, new if k == _F_ID else v)
                    hashes.append(tuple(args))
                    if pttl > 0:
                        hashes.append(("PEXPIRE", mp + new, pttl))
                    index += [("ZADD", idx, _fmt(float(score)), new), ("ZREM", idx, old)]
                    post.append(("DEL", mp + old))
                elif fields:  # the index member is gone (acked or expired meanwhile)
                    post.append(("DEL", mp + old))
                else:  # nothing to move (gone, or moved by an earlier attempt)
                    index.append(("ZREM", idx, old))
                checks.append(("EXISTS", tomb))
                targets.append((new, idx))
        post += checks
        if cluster:
            if hashes:
                await self._run(hashes, "write (hashes)")
            if index:
                await self._run(index, "write (indexes)")
            post_res = await self._run(post, "write (topics, tombstones)") if post else []
        else:
            tail = [self._wait] if self._wait is not None else []
            res = await self._run(hashes + index + post + tail, "write")
            if tail:
                self._note_replicas(int(res.pop()))
            post_res = res[len(hashes) + len(index):]
        if targets:
            found = post_res[len(post_res) - len(targets):]
            fix: list[Cmd] = []
            for (new, idx), hit in zip(targets, found, strict=True):
                if hit:
                    fix += [("DEL", mp + new), ("ZREM", idx, new)]
            if fix:
                await self._run(fix, "write (acked replays)")

    def _note_replicas(self, acked: int) -> None:
        """Fewer replicas than asked confirmed the write within wait_timeout (none
        connected, e.g. right after a failover): the write stands, the guarantee is
        weaker for it, and the log says so."""
        if acked >= self.cfg.wait_replicas:
            return
        self._wait_short += 1
        if self._wait_short == 1 or self._wait_short % 1000 == 0:
            log.warning("redis: only %d of %d replicas confirmed a write within %d ms (%d such writes so far)",
                        acked, self.cfg.wait_replicas, self.cfg.wait_timeout_ms, self._wait_short)

    # -- subscriptions -------------------------------------------------------------------
    async def save_subscription(self, clientid: str, topic: str, qos: int) -> None:
        await self._one(("HSET", self._sp + clientid.encode(), topic.encode(), int(qos)), "save_subscription")

    async def delete_subscription(self, clientid: str, topic: str) -> None:
        await self._one(("HDEL", self._sp + clientid.encode(), topic.encode()), "delete_subscription")

    async def subscriptions(self, clientid: str) -> list[Subscription]:
        raw = await self._one(("HGETALL", self._sp + clientid.encode()), "subscriptions")
        out = []
        for topic, qos in (raw or {}).items():
            try:
                out.append(Subscription(topic.decode(), int(qos)))
            except (UnicodeDecodeError, ValueError):
                log.warning("redis: ignoring a bad subscription entry of %r", clientid)
        return out

    # -- replay reads --------------------------------------------------------------------
    def _deadline(self, now_ms: float) -> float | None:
        return now_ms - self._ttl * 1000.0 if self._ttl > 0 else None

    def _live_min(self, deadline: float | None) -> bytes:
        return b"-inf" if deadline is None else b"(" + _fmt(deadline)

    async def _topic_range(self, lo: bytes, hi: bytes) -> list[bytes]:
        out: list[bytes] = []
        while True:
            page = await self._one(
                ("ZRANGE", self._topics_key, lo, hi, b"BYLEX", b"LIMIT", 0, _TOPIC_PAGE), "stored_topics"
            )
            out += page
            if len(page) < _TOPIC_PAGE:
                return out
            lo = b"(" + page[-1]

    async def stored_topics(self, pattern_prefix: str) -> list[str]:
        prefix = pattern_prefix.encode()
        lo, hi = (b"[" + prefix, b"[" + prefix + b"\xff") if prefix else (b"-", b"+")
        candidates = await self._topic_range(lo, hi)
        if not candidates:
            return []
        live_min = self._live_min(self._deadline(time.time() * 1000.0))
        res = await self._run(
            [("ZRANGE", self._mp + t, b"+inf", live_min, b"BYSCORE", b"REV", b"LIMIT", 0, 1) for t in candidates],
            "stored_topics",
        )
        live: list[bytes] = []
        stale: list[bytes] = []
        for topic, newest in zip(candidates, res, strict=True):
            (live if newest else stale).append(topic)
        if stale:
            await self._cleanup_topics(stale)
        return [t.decode("utf-8", "replace") for t in live]

    async def _cleanup_topics(self, topics: Sequence[bytes]) -> int:
        """Trim expired members of these topics' zsets and drop the topics whose zset
        is gone from the topic index (safe against concurrent publishes, see above).
        Returns the number of members trimmed."""
        mp, deadline = self._mp, self._deadline(time.time() * 1000.0)
        cmds: list[Cmd] = []
        if deadline is not None:
            cmds += [("ZREMRANGEBYSCORE", mp + t, b"-inf", _fmt(deadline)) for t in topics]
        trimmed_n = len(cmds)
        if not self._cluster:
            cmds += [("EVAL", _REMOVE_TOPIC_LUA, 2, mp + t, self._topics_key, t) for t in topics]
            res = await self._run(cmds, "topic clean-up")
            return sum(int(n) for n in res[:trimmed_n])
        cmds += [("EXISTS", mp + t) for t in topics]
        res = await self._run(cmds, "topic clean-up")
        empty = [t for t, n in zip(topics, res[trimmed_n:], strict=True) if not n]
        if empty:
            await self._one(("ZREM", self._topics_key, *empty), "topic clean-up")
            again = await self._run([("EXISTS", mp + t) for t in empty], "topic clean-up")
            back = [t for t, n in zip(empty, again, strict=True) if n]
            if back:  # a publish came in between: put the topic back
                args: list[Any] = ["ZADD", self._topics_key]
                for t in back:
                    args += (0, t)
                await self._one(tuple(args), "topic clean-up")
        return sum(int(n) for n in res[:trimmed_n])

    async def latest_positions(self, topics: Sequence[str]) -> dict[str, float]:
        if not topics:
            return {}
        live_min = self._live_min(self._deadline(time.time() * 1000.0))
        res = await self._run(
            [("ZRANGE", self._idx(t), b"+inf", live_min, b"BYSCORE", b"REV", b"LIMIT", 0, 1, b"WITHSCORES")
             for t in topics],
            "latest_positions",
        )
        out: dict[str, float] = {}
        for t, r in zip(topics, res, strict=True):
            rows = _pairs(r)
            if rows:
                out[t] = rows[0][1]
        return out

    async def count_messages(self, topics: Sequence[str]) -> dict[str, int]:
        unique = list(dict.fromkeys(topics))
        if not unique:
            return {}
        live_min = self._live_min(self._deadline(time.time() * 1000.0))
        try:
            res = await self._run([("ZCOUNT", self._idx(t), live_min, b"+inf") for t in unique], "count_messages")
            counts = [int(n) for n in res]
        except StoreConfigError:  # ZCOUNT not granted (docs/redis-acl.md lists the service's commands only)
            counts = [await self._count_by_range(self._idx(t), live_min) for t in unique]
        return {t: n for t, n in zip(unique, counts, strict=True) if n}

    async def _count_by_range(self, key: bytes, live_min: bytes) -> int:
        total = 0
        while True:
            page = await self._one(
                ("ZRANGE", key, live_min, b"+inf", b"BYSCORE", b"LIMIT", total, _COUNT_PAGE), "count_messages"
            )
            total += len(page)
            if len(page) < _COUNT_PAGE:
                return total

    def read_messages(
        self, ranges: dict[str, tuple[float | None, float]], page_size: int
    ) -> AsyncIterator[list[StoredMessage]]:
        return self._read_messages(dict(ranges), max(1, page_size))

    async def _read_messages(
        self, ranges: dict[str, tuple[float | None, float]], page_size: int
    ) -> AsyncIterator[list[StoredMessage]]:
        deadline = self._deadline(time.time() * 1000.0)
        cursors: list[_Cursor] = []
        for topic, (low, high) in ranges.items():
            if deadline is not None and (low is None or low < deadline):
                low = deadline
            if low is not None and low >= high:
                continue
            lo = b"-inf" if low is None else b"(" + _fmt(low)
            cursors.append(_Cursor(len(cursors), topic, self._idx(topic), lo, _fmt(high)))
        if not cursors:
            return
        fetch = max(_MIN_FETCH, min(page_size, (2 * page_size) // len(cursors)))
        heap: list[tuple[float, bytes, int]] = []
        pending = list(cursors)  # cursors whose buffer is empty and may have more
        while True:
            out: list[tuple[float, bytes, _Cursor]] = []
            while len(out) < page_size:
                while pending:
                    await self._fill(pending, fetch)
                    again = []
                    for c in pending:
                        if c.buf:
                            heapq.heappush(heap, (c.buf[0][0], c.buf[0][1], c.index))
                        elif not c.done:  # its page vanished meanwhile: read on
                            again.append(c)
                    pending = again
                if not heap:
                    break
                _, _, ci = heapq.heappop(heap)
                c = cursors[ci]
                score, _, member = c.buf.popleft()
                out.append((score, member, c))
                if c.buf:
                    heapq.heappush(heap, (c.buf[0][0], c.buf[0][1], ci))
                elif not c.done:
                    pending.append(c)
            if not out:
                return
            page = await self._load(out)
            if page:
                yield page

    async def _fill(self, cursors: Sequence[_Cursor], fetch: int) -> None:
        """Refill the buffers of these cursors (one round trip, plus one per topic
        whose whole page shares one score)."""
        res = await self._run(
            [("ZRANGE", c.key, c.low, c.high, b"BYSCORE", b"LIMIT", 0, fetch, b"WITHSCORES") for c in cursors],
            "read_messages",
        )
        ties: list[tuple[_Cursor, float]] = []
        for c, flat in zip(cursors, res, strict=True):
            rows = _pairs(flat)
            if len(rows) < fetch:
                c.done = True
            elif rows[0][1] == rows[-1][1]:  # a full page of one score: read that score whole
                ties.append((c, rows[0][1]))
                continue
            else:  # the last score may continue on the next page: read it again from there
                last = rows[-1][1]
                while rows and rows[-1][1] == last:
                    rows.pop()
                c.low = _fmt(last)
            _buffer(c, rows)
        if ties:
            res = await self._run(
                [("ZRANGE", c.key, _fmt(s), _fmt(s), b"BYSCORE", b"WITHSCORES") for c, s in ties],
                "read_messages",
            )
            for (c, s), flat in zip(ties, res, strict=True):
                c.low = b"(" + _fmt(s)
                _buffer(c, _pairs(flat))

    async def _load(self, out: Sequence[tuple[float, bytes, _Cursor]]) -> list[StoredMessage]:
        mp = self._mp
        hashes = await self._run([("HGETALL", mp + member) for _, member, _ in out], "read_messages")
        page: list[StoredMessage] = []
        dangling: list[Cmd] = []
        for (score, member, c), h in zip(out, hashes, strict=True):
            if not h:
                dangling.append(("ZREM", c.key, member))
                continue
            try:
                msgid = b62_to_msgid(member)
                page.append(StoredMessage(
                    msgid=msgid,
                    sender=h.get(_F_FROM, b"").decode("utf-8", "replace"),
                    topic=c.topic,
                    qos=int(h.get(_F_QOS) or 1),
                    retain=h.get(_F_RETAIN) == _TRUE,
                    payload=h.get(_F_PAYLOAD, b""),
                    timestamp=int(h.get(_F_TS) or 0),
                    position=score,
                ))
            except (Base62Error, ValueError) as exc:
                log.warning("redis: skipping unreadable stored message %r of %r: %s", member, c.topic, exc)
        if dangling:
            await self._run(dangling, "read_messages (dangling index members)")
        return page

    # -- replay bookkeeping ------------------------------------------------------------------
    async def claim_replay(self, connection: str, highs: dict[str, float]) -> dict[str, float | None]:
        if not highs:
            return {}
        topics = list(highs)
        args: list[Any] = ["EVAL", _CLAIM_LUA, 1, self._mark + connection.encode(),
                           secrets.token_hex(8), REPLAY_MARK_TTL_S]
        for t in topics:
            args += (t.encode(), _fmt(float(highs[t])))
        res = await self._one(tuple(args), "claim_replay")
        return {t: (float(p) if p else None) for t, p in zip(topics, res, strict=True)}

    async def reset_replay_marks(self, connection: str) -> None:
        await self._one(("DEL", self._mark + connection.encode()), "reset_replay_marks")

    def _pend_key(self, topic: str, digest: str) -> bytes:
        return self._pend + digest.encode() + b":" + topic.encode()

    async def register_pending_replays(self, items: Sequence[PendingReplay]) -> None:
        cmds: list[Cmd] = []
        for item in items:
            key = self._pend_key(item.topic, item.digest)
            cmds += [("RPUSH", key, item.msgid.encode()), ("EXPIRE", key, PENDING_REPLAY_TTL_S)]
        await self._run(cmds, "register_pending_replays")

    async def take_pending_replay(self, topic: str, digest: str) -> str | None:
        raw = await self._one(("LPOP", self._pend_key(topic, digest)), "take_pending_replay")
        return raw.decode() if raw else None

    # -- maintenance ---------------------------------------------------------------------------
    async def purge_expired(self, limit: int) -> int:
        """Trim expired members left in topic zsets (their hashes expired by
        themselves; the plugin only trims a topic when it publishes to it) and drop
        topics without messages from the topic index. Walks the topic index from
        where the previous call stopped; returns the number of members trimmed
        (0 with message_ttl = 0: nothing expires)."""
        removed = 0
        start = self._purge_from
        while True:
            page = await self._one(
                ("ZRANGE", self._topics_key, start, b"+", b"BYLEX", b"LIMIT", 0, 200), "purge_expired"
            )
            if page:
                removed += await self._cleanup_topics(page)
                start = b"(" + page[-1]
            if len(page) < 200:
                start = b"-"  # end of the index: the next call starts over
                break
            if removed >= limit:
                break
        self._purge_from = start
        return removed

    async def rebuild_topic_index(self) -> int:
        """Add every topic zset under ``{mp}:`` to the topic index (a store written
        by the Erlang plugin has none). Uses SCAN over the whole keyspace: a one-off
        migration step, not for the hot path. Returns the number of topics found."""
        client = self._c()
        pattern = self._mp.replace(b"\\", b"\\\\").replace(b"*", b"\\*").replace(b"?", b"\\?")
        pattern = pattern.replace(b"[", b"\\[") + b"*"
        found = 0
        try:
            batch: list[bytes] = []
            async for key in client.scan_iter(match=pattern, count=1000, _type="zset"):
                batch.append(bytes(key)[len(self._mp):])
                if len(batch) >= 500:
                    found += await self._add_topics(batch)
                    batch = []
            if batch:
                found += await self._add_topics(batch)
        except _ERRORS as exc:
            raise _wrap(exc, "rebuild_topic_index") from None
        return found

    async def _add_topics(self, topics: Iterable[bytes]) -> int:
        args: list[Any] = ["ZADD", self._topics_key]
        n = 0
        for t in topics:
            args += (0, t)
            n += 1
        if n:
            await self._one(tuple(args), "rebuild_topic_index")
        return n


def _score(msgid: str, now_ms: float) -> float:
    """Position of a new message: the GUID's microsecond timestamp in ms."""
    try:
        ms = int(msgid[:16], 16) / 1000.0
    except ValueError:
        return now_ms
    if len(msgid) != 32 or abs(ms - now_ms) > _GUID_SKEW_MS:
        return now_ms
    return ms


def _buffer(c: _Cursor, rows: list[tuple[bytes, float]]) -> None:
    order = _B62_ORDER
    items = [(score, member.translate(order), member) for member, score in rows]
    for i in range(1, len(items)):
        if items[i][0] == items[i - 1][0]:  # equal scores: GUID order
            items.sort()
            break
    c.buf.extend(items)
