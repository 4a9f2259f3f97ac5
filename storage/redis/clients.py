"""Building redis-py clients for the three topologies, with our TLS and our packing.

single: one pool of ``pool_size`` connections; sentinel: ``Sentinel.master_for``
(follows a failover: a connection to a demoted master is dropped and the next one
asks the sentinels again; sentinel nodes get the TLS settings and no credentials,
as in the plugin 2.0.0, unless one answers NOAUTH); cluster: ``RedisCluster`` with
``pool_size`` connections per node. TLS (``ssl { }``) applies to every connection,
sentinels included: the context of ``storage.tls.client_context`` (CA, client
certificate, verify, and ``server_name_indication`` as SNI and the name to verify).

No per-reply read timer (redis-py arms one per reply of a pipeline, a third of a
save's cost): every round trip runs under one deadline instead (``link.py``), and
commands are serialised by hiredis: with both, a pipelined save costs ~15 us of CPU
(batches of 100, 300-byte payloads, ~45k saves/s on one connection of the 2-core
dev machine; ~8.7k/s one save per round trip).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterable
from typing import Any

import hiredis
from redis._parsers.commands import AsyncCommandsParser
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import Connection, ConnectionPool, SSLConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelManagedConnection
from redis.backoff import AbstractBackoff
from redis.exceptions import AuthenticationError, DataError, ResponseError

from storage.base import StoreConfigError
from storage.config import RedisConfig
from storage.redis.errors import ERRORS
from storage.retry import Backoff
from storage.tls import TlsSetupError, client_context

OP_TIMEOUT_S = 10.0  # one round trip (a pipeline or a command), connecting included
CONNECT_TIMEOUT_S = 5.0
# redis-py reconnects and sends a command again after a lost connection (a pooled
# connection the server closed, a failover): twice at most, paced by the one policy.
# Redis may have run the command whose reply was lost, so every command the store
# sends must be safe to run twice: the writes are idempotent, and what is not (the
# pending-replay registry's RPUSH and LPOP) runs in scripts that recognise a re-send
# of their call (bookkeeping.py).
_RESEND = Backoff(base=0.05, cap=1.0)
_RESENDS = 2


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


class _PolicyBackoff(AbstractBackoff):
    """redis-py's pauses between re-sends, taken from ``storage.retry.Backoff``."""

    def __init__(self, backoff: Backoff) -> None:
        self._backoff = backoff

    def compute(self, failures: int) -> float:
        return self._backoff.delay(failures)


def tls_of(cfg: RedisConfig) -> ssl.SSLContext | None:
    if not cfg.ssl.enable:
        return None
    try:
        return client_context(cfg.ssl, "redis.ssl")
    except TlsSetupError as exc:
        raise StoreConfigError(str(exc)) from None


class Clients:
    """Makes the client of the configured topology (and one-off node clients)."""

    def __init__(self, cfg: RedisConfig, tls: ssl.SSLContext | None) -> None:
        self.cfg = cfg
        self.tls = tls

    def _base_kwargs(self) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "username": cfg.username or None,
            "password": cfg.password or None,
            # redis-py drops a connection whose read was cancelled by the deadline
            "socket_timeout": None,
            "socket_connect_timeout": CONNECT_TIMEOUT_S,
            "driver_info": None,  # no CLIENT SETINFO (not in Redis < 7.2, one command less)
            "retry": Retry(_PolicyBackoff(_RESEND), _RESENDS),
            "decode_responses": False,
        }

    def node(self, host: str, port: int, *, db: int = 0, max_connections: int = 4,
             with_auth: bool = True) -> Redis:
        kwargs = self._base_kwargs()
        if not with_auth:
            kwargs.update(username=None, password=None)
        kwargs.update(host=host, port=port, db=db, max_connections=max_connections)
        if self.tls is not None:
            kwargs.update(connection_class=_TlsConnection, ox_tls=self.tls)
        else:
            kwargs["connection_class"] = _FastConnection
        return Redis.from_pool(ConnectionPool(**kwargs))

    def single(self) -> Redis:
        server = self.cfg.servers[0]
        return self.node(server.host, server.port, db=self.cfg.database, max_connections=self.cfg.pool_size)

    def _sentinel_nodes(self, with_auth: bool) -> list[Redis]:
        # every new master connection asks a sentinel first: as many as the master pool
        size = max(4, self.cfg.pool_size)
        return [self.node(s.host, s.port, with_auth=with_auth, max_connections=size) for s in self.cfg.servers]

    async def _sentinels_need_auth(self) -> bool:
        """Sentinels usually run without a password (the plugin 2.0.0 sends none);
        use the data nodes' credentials only if a sentinel asks for them."""
        if not (self.cfg.username or self.cfg.password):
            return False
        for client in self._sentinel_nodes(with_auth=False):
            try:
                async with asyncio.timeout(OP_TIMEOUT_S):
                    await client.execute_command("PING")  # type: ignore[no-untyped-call]
                return False
            except AuthenticationError:
                return True
            except ResponseError as exc:
                if "NOAUTH" in str(exc) or "NOPERM" in str(exc):
                    return True
            except ERRORS:
                continue
            finally:
                await client.aclose()
        return False

    async def sentinel(self) -> tuple[Redis, Sentinel]:
        sentinel = Sentinel([], sentinel_kwargs={})  # type: ignore[no-untyped-call]
        sentinel.sentinels = self._sentinel_nodes(await self._sentinels_need_auth())
        kwargs = self._base_kwargs()
        kwargs.update(db=self.cfg.database, max_connections=self.cfg.pool_size)
        if self.tls is not None:
            kwargs.update(connection_class=_SentinelTlsConnection, ox_tls=self.tls)
        else:
            kwargs["connection_class"] = _SentinelConnection
        client: Redis = sentinel.master_for(self.cfg.sentinel, **kwargs)
        return client, sentinel

    def cluster(self) -> RedisCluster:
        kwargs = self._base_kwargs()
        kwargs.pop("retry")  # the cluster client has its own (it re-reads the slot map)
        nodes = [ClusterNode(s.host, s.port) for s in self.cfg.servers]
        client = RedisCluster(startup_nodes=nodes, max_connections=self.cfg.pool_size, **kwargs)
        client.commands_parser = _FirstArgKey()
        # RedisCluster takes no connection class: set ours (hiredis packing; for TLS our
        # context with CA, client certificate, verify and the SNI name) in the
        # connection_kwargs dict that every node, also those learnt later, is built from.
        conn_class: type[Connection] = _FastConnection if self.tls is None else _TlsConnection
        client.connection_kwargs["connection_class"] = conn_class
        if self.tls is not None:
            client.connection_kwargs["ox_tls"] = self.tls
        for node in client.startup_nodes:
            node.connection_class = conn_class
            if self.tls is not None:
                node.connection_kwargs["ox_tls"] = self.tls
        return client
