"""The three backends as the end-to-end tests see them: a config block in its own
namespace, and a way to look at what is stored (with plain clients, not the
service's own store code)."""

from __future__ import annotations

import secrets
import sqlite3
from pathlib import Path
from typing import Any

import aiomysql
import redis.asyncio as aioredis

from storage.redis.permissions import PROBE_TAG

REDIS_URL = "redis://127.0.0.1:6379/0"
MYSQL = {"host": "127.0.0.1", "port": 3306, "user": "root", "password": ""}


def _topics(topics: list[str]) -> str:
    return "[" + ", ".join(f'"{t}"' for t in topics) + "]"


class BackendUnderTest:
    name: str

    def hocon(self, topics: list[str], message_ttl: int, batch_size: int) -> str:
        raise NotImplementedError

    async def setup(self) -> None:
        return None

    async def teardown(self) -> None:
        return None

    async def count_messages(self) -> int:
        raise NotImplementedError

    async def count_subscriptions(self) -> int:
        raise NotImplementedError


class RedisBackend(BackendUnderTest):
    """The machine's Redis on 6379, or a topology started by the fixtures
    (``tests/redis_servers.py``): sentinel or cluster."""

    name = "redis"

    def __init__(self, topology: Any = None, extra: str = "") -> None:
        self.topology = topology
        self.extra = extra
        self.ns = f"oxe2e{secrets.token_hex(4)}"
        self.msg_prefix = f"{self.ns}:msg"
        self.sub_prefix = f"{self.ns}:sub"
        self.client = aioredis.Redis.from_url(REDIS_URL)

    def _block(self) -> str:
        if self.topology is None:
            return 'servers = "127.0.0.1:6379"'
        cfg = self.topology.config()
        return f'servers = "{cfg["servers"]}", redis_type = {cfg["redis_type"]}, sentinel = "{cfg["sentinel"]}"'

    def hocon(self, topics: list[str], message_ttl: int, batch_size: int) -> str:
        return (f"redis {{ enable = true, {self._block()}, topics = {_topics(topics)}, "
                f'message_key_prefix = "{self.msg_prefix}", subscription_key_prefix = "{self.sub_prefix}", '
                f"message_ttl = {message_ttl or 7200}, batch_size = {batch_size} {self.extra} }}")

    def _nodes(self) -> list[aioredis.Redis]:
        """A plain client per data-holding node (every primary of a cluster)."""
        kind = getattr(self.topology, "redis_type", "single")
        if kind == "cluster":
            return [aioredis.Redis(host=n.host, port=n.port) for n in self.topology.primaries()]
        if kind == "sentinel":
            host, port = self.topology.master_address()
            return [aioredis.Redis(host=host, port=port)]
        return [self.client]

    async def _scan(self, pattern: str) -> list[tuple[aioredis.Redis, bytes]]:
        found = []
        for node in self._nodes():
            found += [(node, k) async for k in node.scan_iter(match=pattern, count=1000)]
        return found

    async def _plugin_keys(self, prefix: str) -> list[tuple[aioredis.Redis, bytes]]:
        """Keys under one of the plugin's prefixes, without the permission-probe keys a
        service starting meanwhile briefly holds there."""
        return [(node, key) for node, key in await self._scan(f"{prefix}:*") if PROBE_TAG not in key]

    async def layout_keys(self) -> list[bytes]:
        """Keys of the plugin's layout (what its own cleanup test looks at)."""
        found = await self._plugin_keys(self.msg_prefix) + await self._plugin_keys(self.sub_prefix)
        return [key for _, key in found]

    async def count_messages(self) -> int:
        return sum([await node.type(key) == b"hash" for node, key in await self._plugin_keys(self.msg_prefix)])

    async def count_subscriptions(self) -> int:
        return sum([await node.hlen(key) for node, key in await self._plugin_keys(self.sub_prefix)])

    async def teardown(self) -> None:
        for node, key in await self._scan(f"{self.ns}*"):
            await node.delete(key)
        await self.client.aclose()


class MysqlBackend(BackendUnderTest):
    name = "mysql"

    def __init__(self) -> None:
        self.database = f"oxe2e_{secrets.token_hex(4)}"

    def hocon(self, topics: list[str], message_ttl: int, batch_size: int) -> str:
        return (f'mysql {{ enable = true, server = "127.0.0.1:3306", username = root, password = "", '
                f'database = "{self.database}", init_default_schema = true, topics = {_topics(topics)}, '
                f"message_ttl = {message_ttl}, batch_size = {batch_size}, pool_size = 4 }}")

    async def _query(self, sql: str, database: str | None = None) -> int:
        conn = await aiomysql.connect(**MYSQL, db=database, autocommit=True)
        try:
            async with conn.cursor() as cur:
                await cur.execute(sql)
                row = await cur.fetchone()
                return int(row[0]) if row else 0
        finally:
            conn.close()

    async def setup(self) -> None:
        await self._query(f"create database {self.database}")

    async def teardown(self) -> None:
        await self._query(f"drop database if exists {self.database}")

    async def count_messages(self) -> int:
        return await self._query("select count(*) from mqtt_msg", self.database)

    async def count_subscriptions(self) -> int:
        return await self._query("select count(*) from mqtt_sub", self.database)


class SqliteBackend(BackendUnderTest):
    name = "sqlite"

    def __init__(self, directory: Path) -> None:
        self.path = directory / "offline.sqlite3"

    def hocon(self, topics: list[str], message_ttl: int, batch_size: int) -> str:
        return (f'sqlite {{ enable = true, path = "{self.path}", topics = {_topics(topics)}, '
                f"message_ttl = {message_ttl}, batch_size = {batch_size} }}")

    def _count(self, table: str) -> int:
        with sqlite3.connect(self.path) as conn:
            return int(conn.execute(f"select count(*) from {table}").fetchone()[0])

    async def count_messages(self) -> int:
        return self._count("mqtt_msg")

    async def count_subscriptions(self) -> int:
        return self._count("mqtt_sub")


def make_backend(name: str, tmp_path: Path, topology: Any = None) -> BackendUnderTest:
    if name.startswith("redis"):
        return RedisBackend(topology)
    if name == "mysql":
        return MysqlBackend()
    return SqliteBackend(tmp_path)
