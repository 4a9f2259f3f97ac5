"""The three backends as the end-to-end tests see them: a config block in its own
namespace, and a way to look at what is stored (with plain clients, not the
service's own store code)."""

from __future__ import annotations

import secrets
import sqlite3
from pathlib import Path

import aiomysql
import redis.asyncio as aioredis

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
    name = "redis"

    def __init__(self) -> None:
        self.ns = f"oxe2e{secrets.token_hex(4)}"
        self.msg_prefix = f"{self.ns}:msg"
        self.sub_prefix = f"{self.ns}:sub"
        self.client = aioredis.Redis.from_url(REDIS_URL)

    def hocon(self, topics: list[str], message_ttl: int, batch_size: int) -> str:
        return (f'redis {{ enable = true, servers = "127.0.0.1:6379", topics = {_topics(topics)}, '
                f'message_key_prefix = "{self.msg_prefix}", subscription_key_prefix = "{self.sub_prefix}", '
                f"message_ttl = {message_ttl or 7200}, batch_size = {batch_size} }}")

    async def layout_keys(self) -> list[bytes]:
        """Keys of the plugin's layout (what its own cleanup test looks at)."""
        keys = [k async for k in self.client.scan_iter(match=f"{self.msg_prefix}:*", count=1000)]
        keys += [k async for k in self.client.scan_iter(match=f"{self.sub_prefix}:*", count=1000)]
        return keys

    async def count_messages(self) -> int:
        n = 0
        async for key in self.client.scan_iter(match=f"{self.msg_prefix}:*", count=1000):
            if await self.client.type(key) == b"hash":
                n += 1
        return n

    async def count_subscriptions(self) -> int:
        n = 0
        async for key in self.client.scan_iter(match=f"{self.sub_prefix}:*", count=1000):
            n += await self.client.hlen(key)
        return n

    async def teardown(self) -> None:
        async for key in self.client.scan_iter(match=f"{self.ns}*", count=1000):
            await self.client.delete(key)
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


def make_backend(name: str, tmp_path: Path) -> BackendUnderTest:
    if name == "redis":
        return RedisBackend()
    if name == "mysql":
        return MysqlBackend()
    return SqliteBackend(tmp_path)
