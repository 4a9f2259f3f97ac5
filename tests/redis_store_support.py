"""Shared by the RedisStore tests against the real Redis at 127.0.0.1:6379: message
helpers, a random key prefix per test, stores in single and cluster-phases mode."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from exhook.config import HostPort, RedisConfig
from storage.base import WriteRejected
from storage.model import SaveMessage, StoredMessage, WriteOp
from storage.redis import RedisStore

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
NODE = 0x0A0B0C0D0E0F


def guid(us: int, seq: int = 0, node: int = NODE) -> str:
    """An EMQX GUID: 64-bit microsecond timestamp, 48-bit node, 16-bit sequence."""
    return f"{us:016X}{node:012X}{seq:04X}"


def now_us() -> int:
    return int(time.time() * 1_000_000)


def smsg(msgid: str, topic: str, payload: bytes = b"p", *, sender: str = "pub", qos: int = 1,
         retain: bool = False, ts: int | None = None) -> StoredMessage:
    return StoredMessage(msgid=msgid, sender=sender, topic=topic, qos=qos, retain=retain, payload=payload,
                         timestamp=ts if ts is not None else int(msgid[:16], 16) // 1000)


def save(*msgs: StoredMessage) -> list[SaveMessage]:
    return [SaveMessage(m) for m in msgs]


EVERYTHING = (None, float("inf"))


async def write_setting_aside(store: RedisStore, ops: list[WriteOp]) -> list[tuple[int, str]]:
    """What the ordered writer does: write the batch; when the store rejects an op
    (its index is always known here), set it aside and write the rest again.
    Returns (index in ``ops``, reason) of every op set aside."""
    remaining = list(enumerate(ops))
    rejected: list[tuple[int, str]] = []
    while True:
        try:
            await store.write([op for _, op in remaining])
            return rejected
        except WriteRejected as exc:
            assert exc.index is not None and "\n" not in str(exc)
            rejected.append((remaining[exc.index][0], exc.reason))
            del remaining[exc.index]


# ---------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------


@pytest.fixture
async def admin() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis(host=REDIS_HOST, port=REDIS_PORT)
    try:
        await client.ping()
    except Exception as exc:  # pragma: no cover - environment
        pytest.skip(f"no Redis at {REDIS_HOST}:{REDIS_PORT}: {exc}")
    yield client
    await client.aclose()


@pytest.fixture
async def prefix(admin: aioredis.Redis) -> AsyncIterator[str]:
    token = "oxt" + secrets.token_hex(5)
    yield token
    keys = [k async for k in admin.scan_iter(match=token + "*", count=1000)]
    if keys:
        await admin.delete(*keys)


StoreFactory = Callable[..., Awaitable[RedisStore]]


@pytest.fixture(params=["single", "cluster-phases"])
async def make_store(request: pytest.FixtureRequest, prefix: str) -> AsyncIterator[StoreFactory]:
    stores: list[RedisStore] = []

    async def factory(ttl: int = 7200, **kw: Any) -> RedisStore:
        cfg = RedisConfig(
            servers=(HostPort(REDIS_HOST, REDIS_PORT),),
            message_key_prefix=f"{prefix}:msg",
            subscription_key_prefix=f"{prefix}:sub",
            message_ttl=ttl,
            **kw,
        )
        store = RedisStore(cfg)
        await store.open()
        if request.param == "cluster-phases":
            store._link.cluster = True  # exercise the cluster write phases
        stores.append(store)
        return store

    yield factory
    for store in stores:
        await store.close()


@pytest.fixture
async def store(make_store: StoreFactory) -> RedisStore:
    return await make_store()


def mkey(prefix: str, rest: str | bytes) -> bytes:
    return f"{prefix}:msg:".encode() + (rest.encode() if isinstance(rest, str) else rest)


@pytest.fixture
async def acl_user(admin: aioredis.Redis) -> AsyncIterator[Callable[..., Awaitable[tuple[str, str]]]]:
    created: list[str] = []

    async def make(*rules: str) -> tuple[str, str]:
        name, password = "oxt-" + secrets.token_hex(4), secrets.token_hex(12)
        await admin.execute_command("ACL", "SETUSER", name, "reset", "on", f">{password}", *rules)
        created.append(name)
        return name, password

    yield make
    for name in created:
        await admin.execute_command("ACL", "DELUSER", name)


def store_cfg(prefix: str, **kw: Any) -> RedisConfig:
    return RedisConfig(servers=(HostPort(REDIS_HOST, REDIS_PORT),), message_key_prefix=f"{prefix}:msg",
                       subscription_key_prefix=f"{prefix}:sub", **kw)


def key_rules(prefix: str) -> list[str]:
    return [f"~{prefix}:msg:*", f"~{prefix}:msg~ox:*", f"~{prefix}:sub:*"]
