"""The open connection to Redis: connect and diagnose, then one round trip at a time.

At most ``pool_size`` operations run at once (a semaphore), so no pool ever needs
more than ``pool_size`` connections per server. Every round trip has one deadline
(``OP_TIMEOUT_S``) instead of redis-py's per-reply socket timeout. Failures raise
``StoreError`` (``StoreConfigError`` for authentication and ACL refusals).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import (
    AuthenticationError,
    AuthenticationWrongNumberOfArgsError,
    NoPermissionError,
    RedisClusterException,
    ResponseError,
)

from storage.base import StoreConfigError, StoreError
from storage.config import RedisConfig
from storage.errors import first_line, one_line
from storage.redis.clients import OP_TIMEOUT_S, Clients, tls_of
from storage.redis.errors import ERRORS, wrap
from storage.redis.keys import Cmd
from storage.redis.rounds import Round

log = logging.getLogger(__name__)


class Link:
    """The client of the configured topology, and the one way commands are sent."""

    def __init__(self, cfg: RedisConfig) -> None:
        self.cfg = cfg
        # cluster mode: keys live on different nodes, so ordered phases take separate round trips
        self.cluster = cfg.redis_type == "cluster"
        self.who = f"user {cfg.username!r}" if cfg.username else "default user"
        self.where = f"{cfg.redis_type} {','.join(str(s) for s in cfg.servers)}"
        self._sem = asyncio.Semaphore(max(1, cfg.pool_size))
        self._client: Redis | RedisCluster | None = None
        self._sentinel: Sentinel | None = None

    async def connect(self) -> None:
        """Build the client and PING; one line naming the cause on failure."""
        cfg, where, who = self.cfg, self.where, self.who
        clients = Clients(cfg, tls_of(cfg))
        if self.cluster and cfg.database != 0:
            log.warning("redis.database = %d is ignored in cluster mode (cluster has database 0 only)",
                        cfg.database)
        try:
            if cfg.redis_type == "single":
                self._client = clients.single()
            elif cfg.redis_type == "sentinel":
                self._client, self._sentinel = await clients.sentinel()
            else:
                self._client = clients.cluster()
            async with asyncio.timeout(OP_TIMEOUT_S):
                await self._client.execute_command("PING")
        except (AuthenticationError, AuthenticationWrongNumberOfArgsError) as exc:
            await self.close()
            raise StoreConfigError(f"redis ({where}): authentication failed for {who}: {first_line(exc)}") from None
        except NoPermissionError as exc:
            await self.close()
            raise StoreConfigError(f"redis ({where}): {who} may not connect: {first_line(exc)}") from None
        except ResponseError as exc:
            await self.close()
            text = first_line(exc)
            if "DB index" in text:
                raise StoreConfigError(f"redis ({where}): database {cfg.database}: {text}") from None
            raise StoreConfigError(f"redis ({where}): {text}") from None
        except ERRORS as exc:
            await self.close()
            if self.cluster and isinstance(exc, RedisClusterException):
                # redis-py reports a refused CLUSTER SLOTS as "cluster mode is not enabled"
                await self._diagnose_cluster(clients)
            raise StoreError(f"redis ({where}): cannot connect: {one_line(exc)}") from None

    async def _diagnose_cluster(self, clients: Clients) -> None:
        """Ask the configured nodes for CLUSTER SLOTS directly; raise StoreConfigError
        with the reason if one of them answers why the cluster cannot be used."""
        where, who = self.where, self.who
        for server in self.cfg.servers:
            client = clients.node(server.host, server.port)
            try:
                async with asyncio.timeout(OP_TIMEOUT_S):
                    await client.execute_command("CLUSTER", "SLOTS")  # type: ignore[no-untyped-call]
            except NoPermissionError:
                raise StoreConfigError(
                    f"redis ({where}): {who} may not run CLUSTER SLOTS (the commands the service needs "
                    "are in docs/redis-acl.md)") from None
            except (AuthenticationError, AuthenticationWrongNumberOfArgsError) as exc:
                raise StoreConfigError(f"redis ({where}): authentication failed for {who}: "
                                       f"{first_line(exc)}") from None
            except ResponseError as exc:
                if "cluster" in str(exc).lower():
                    raise StoreConfigError(f"redis ({where}): {server} is not a cluster node "
                                           f"({first_line(exc)}); check redis_type") from None
            except ERRORS:
                continue
            finally:
                await client.aclose()

    async def close(self) -> None:
        client, self._client = self._client, None
        sentinel, self._sentinel = self._sentinel, None
        if client is not None:
            try:
                await client.aclose()
            except ERRORS as exc:
                log.debug("redis close: %s", exc)
        if sentinel is not None:
            for node in sentinel.sentinels:
                try:
                    await node.aclose()
                except ERRORS as exc:
                    log.debug("redis sentinel close: %s", exc)

    @property
    def client(self) -> Redis | RedisCluster:
        if self._client is None:
            raise StoreError("redis store is not open")
        return self._client

    async def run(self, cmds: Sequence[Cmd], what: str, *, refusals: bool = False) -> list[Any]:
        """One pipeline round trip (no MULTI). Raises StoreError on any error, or,
        with ``refusals``, returns the server's error replies in their places."""
        if not cmds:
            return []
        client = self.client
        try:
            async with self._sem, asyncio.timeout(OP_TIMEOUT_S):
                pipe = client.pipeline(transaction=False)
                for cmd in cmds:
                    pipe.execute_command(*cmd)
                return list(await pipe.execute(raise_on_error=not refusals))
        except ERRORS as exc:
            raise wrap(exc, what) from None

    async def send(self, rnd: Round) -> None:
        """Run ``rnd``; each of its replies holds its answer or the server's refusal."""
        if rnd:
            rnd.settle(await self.run(rnd.commands, rnd.what, refusals=True))

    async def one(self, cmd: Cmd, what: str) -> Any:
        client = self.client
        try:
            async with self._sem, asyncio.timeout(OP_TIMEOUT_S):
                return await client.execute_command(*cmd)
        except ERRORS as exc:
            raise wrap(exc, what) from None
