"""A store that may not be reachable yet.

The service starts even when its database is down (the broker must still get
answers): until ``open`` has succeeded, every call fails fast with ``StoreError``,
which the writer and the background jobs already retry.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from storage.base import Store, StoreError
from storage.model import PendingReplay, StoredMessage, Subscription, WriteOp


class GatedStore(Store):
    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.name = inner.name
        self.is_open = False

    def _check(self) -> Store:
        if not self.is_open:
            raise StoreError(f"{self.name} is not connected yet")
        return self.inner

    async def open(self) -> None:
        await self.inner.open()
        self.is_open = True

    async def close(self) -> None:
        self.is_open = False
        await self.inner.close()

    async def write(self, ops: Sequence[WriteOp]) -> None:
        await self._check().write(ops)

    async def save_subscription(self, clientid: str, topic: str, qos: int) -> None:
        await self._check().save_subscription(clientid, topic, qos)

    async def delete_subscription(self, clientid: str, topic: str) -> None:
        await self._check().delete_subscription(clientid, topic)

    async def subscriptions(self, clientid: str) -> list[Subscription]:
        return await self._check().subscriptions(clientid)

    async def stored_topics(self, pattern_prefix: str) -> list[str]:
        return await self._check().stored_topics(pattern_prefix)

    async def latest_positions(self, topics: Sequence[str]) -> dict[str, float]:
        return await self._check().latest_positions(topics)

    def read_messages(
        self, ranges: dict[str, tuple[float | None, float]], page_size: int
    ) -> AsyncIterator[list[StoredMessage]]:
        return self._check().read_messages(ranges, page_size)

    async def claim_replay(self, connection: str, highs: dict[str, float]) -> dict[str, float | None]:
        return await self._check().claim_replay(connection, highs)

    async def reset_replay_marks(self, connection: str) -> None:
        await self._check().reset_replay_marks(connection)

    async def register_pending_replays(self, items: Sequence[PendingReplay]) -> None:
        await self._check().register_pending_replays(items)

    async def take_pending_replay(self, topic: str, digest: str) -> str | None:
        return await self._check().take_pending_replay(topic, digest)

    async def purge_expired(self, limit: int) -> int:
        return await self._check().purge_expired(limit)

    async def ping(self) -> None:
        await self._check().ping()
