"""The v2 pending-replay registry when Redis ran a command whose reply was lost.

redis-py then sends the command again on a new connection (storage/redis/clients.py).
A loopback proxy owned by each test (tests/lost_reply_proxy.py) sits in front of the
shared Redis at 127.0.0.1:6379, lets the command through and cuts the connection
before its reply comes back. The shared server itself is never touched.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from exhook.config import HostPort, RedisConfig
from storage.base import StoreError
from storage.model import DropPendingReplay, PendingReplay
from storage.redis import RedisStore
from storage.redis.keys import Keys
from tests.lost_reply_proxy import LostReplyProxy
from tests.redis_store_support import REDIS_HOST, REDIS_PORT, admin, prefix

__all__ = ["admin", "prefix"]  # fixtures

DIGEST = "d" * 32
A, B = "A" * 32, "B" * 32


def _registry_op(command: bytes) -> Callable[[bytes], bool]:
    """Matches what the store sends to run ``command`` on a registry key."""
    return lambda data: command in data and b"~ox:pend:" in data


OpenStore = Callable[[int], contextlib.AbstractAsyncContextManager[RedisStore]]


@pytest.fixture
def open_store(prefix: str) -> OpenStore:
    @contextlib.asynccontextmanager
    async def make(port: int) -> AsyncIterator[RedisStore]:
        store = RedisStore(RedisConfig(servers=(HostPort(REDIS_HOST, port),), message_key_prefix=f"{prefix}:msg",
                                       subscription_key_prefix=f"{prefix}:sub"))
        await store.open()
        try:
            yield store
        finally:
            await store.close()

    return make


def _key(prefix: str, topic: str) -> str:
    return f"{prefix}:msg~ox:pend:{DIGEST}:{topic}"


async def test_a_resent_registration_registers_once(
    open_store: OpenStore, admin: aioredis.Redis, prefix: str
) -> None:
    async with LostReplyProxy((REDIS_HOST, REDIS_PORT), _registry_op(b"RPUSH")) as proxy:
        async with open_store(proxy.port) as store:
            await store.register_pending_replays([PendingReplay("r/1", DIGEST, A)])
            assert proxy.lost == 1  # Redis ran it, redis-py sent it again
            assert await admin.lrange(_key(prefix, "r/1"), 0, -1) == [A.encode()]
            # publish/bulk answered, the hook call took nothing: the entry is dropped ...
            await store.write([DropPendingReplay("r/1", DIGEST, A)])
            # ... and an unrelated publish of the same topic and payload is not a replay
            assert await store.take_pending_replay("r/1", DIGEST) is None


async def test_a_resent_take_pops_one_entry(
    open_store: OpenStore, admin: aioredis.Redis, prefix: str
) -> None:
    async with LostReplyProxy((REDIS_HOST, REDIS_PORT), _registry_op(b"LPOP")) as proxy:
        async with open_store(proxy.port) as store:
            await store.register_pending_replays([PendingReplay("r/2", DIGEST, A), PendingReplay("r/2", DIGEST, B)])
            # the re-send answers what the first run took, and takes nothing more
            assert await store.take_pending_replay("r/2", DIGEST) == A
            assert proxy.lost == 1
            assert await admin.lrange(_key(prefix, "r/2"), 0, -1) == [B.encode()]
            assert await store.take_pending_replay("r/2", DIGEST) == B
            assert await store.take_pending_replay("r/2", DIGEST) is None


async def test_a_failed_registration_leaves_nothing_behind(
    open_store: OpenStore, admin: aioredis.Redis, prefix: str
) -> None:
    # every send's reply is lost (the first one ran): the call fails, and the caller
    # registers again as a new call, which must not find the first one's entries
    async with LostReplyProxy((REDIS_HOST, REDIS_PORT), _registry_op(b"RPUSH"), times=3) as proxy:
        async with open_store(proxy.port) as store:
            items = [PendingReplay("r/3", DIGEST, A), PendingReplay("r/4", DIGEST, B)]
            with pytest.raises(StoreError):
                await store.register_pending_replays(items)
            assert proxy.lost == 3
            assert await admin.exists(_key(prefix, "r/3"), _key(prefix, "r/4")) == 0
            await store.register_pending_replays(items)  # the caller's retry
            assert await admin.lrange(_key(prefix, "r/3"), 0, -1) == [A.encode()]
            assert await admin.lrange(_key(prefix, "r/4"), 0, -1) == [B.encode()]


@pytest.mark.parametrize("mp", ["mqtt:msg", "{mqtt}:msg", "mq{tt:msg", "mq}tt:msg"])
@pytest.mark.parametrize("topic", ["t/1", "a}b", "{x}y", "}{", "t{}/1", "x{y", "{}"])
def test_a_call_record_is_in_the_slot_of_its_registry_key(mp: str, topic: str) -> None:
    # in cluster mode, a script may only touch keys of one slot
    cfg = RedisConfig(message_key_prefix=mp, redis_type="cluster")
    keys = Keys.of(cfg)
    bookkeeping = RedisStore(cfg)._bookkeeping
    key = keys.pend(topic.encode(), DIGEST.encode())
    record = bookkeeping.call_record(key, b"0123456789abcdef")
    assert record.startswith(keys.ours) and key_slot(record) == key_slot(key)
