"""A store that may not be reachable yet.

The service starts even when its database is down (the broker must still get
answers): until ``open`` has succeeded, every call fails fast with ``StoreError``,
which the writer and the background jobs already retry. Every failed operation is
also reported to ``on_failure`` (the service counts them by operation).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeVar

from storage.base import Store, StoreError
from storage.errors import first_line
from storage.model import PendingReplay, StoredMessage, Subscription, WriteOp

T = TypeVar("T")


class GatedStore(Store):
    def __init__(self, inner: Store, on_failure: Callable[[str], None] = lambda operation: None) -> None:
        self.inner = inner
        self._on_failure = on_failure
        self.name = inner.name
        self.is_open = False
        self._open_error = ""

    def _check(self) -> Store:
        if not self.is_open:
            why = f" ({self._open_error})" if self._open_error else ""
            raise StoreError(f"{self.name} is not connected yet{why}")
        return self.inner

    async def open(self) -> None:
        try:
            await self.inner.open()
        except StoreError as exc:
            # readiness and every failing call then say why, not only "not connected"
            self._open_error = first_line(exc)
            raise
        self.is_open = True
        self._open_error = ""

    async def close(self) -> None:
        self.is_open = False
        await self.inner.close()

    async def _call(self, operation: str, call: Callable[[Store], Awaitable[T]]) -> T:
        try:
            return await call(self._check())
        except StoreError:
            self._on_failure(operation)
            raise

    async def write(self, ops: Sequence[WriteOp]) -> None:
        await self._call("write", lambda s: s.write(ops))

    async def save_subscription(self, clientid: str, topic: str, qos: int) -> None:
        await self._call("save_subscription", lambda s: s.save_subscription(clientid, topic, qos))

    async def delete_subscription(self, clientid: str, topic: str) -> None:
        await self._call("delete_subscription", lambda s: s.delete_subscription(clientid, topic))

    async def subscriptions(self, clientid: str) -> list[Subscription]:
        return await self._call("subscriptions", lambda s: s.subscriptions(clientid))

    async def stored_topics(self, pattern_prefix: str) -> list[str]:
        return await self._call("stored_topics", lambda s: s.stored_topics(pattern_prefix))

    async def latest_positions(self, topics: Sequence[str]) -> dict[str, float]:
        return await self._call("latest_positions", lambda s: s.latest_positions(topics))

    async def read_messages(
        self, ranges: dict[str, tuple[float | None, float]], page_size: int
    ) -> AsyncIterator[list[StoredMessage]]:
        pages = self._check().read_messages(ranges, page_size)
        try:
            async for page in pages:
                yield page
        except StoreError:
            self._on_failure("read_messages")
            raise
        finally:
            aclose = getattr(pages, "aclose", None)
            if aclose is not None:
                await aclose()

    async def count_messages(self, topics: Sequence[str]) -> dict[str, int]:
        return await self._call("count_messages", lambda s: s.count_messages(topics))

    async def claim_replay(self, connection: str, highs: dict[str, float]) -> dict[str, float | None]:
        return await self._call("claim_replay", lambda s: s.claim_replay(connection, highs))

    async def reset_replay_marks(self, connection: str) -> None:
        await self._call("reset_replay_marks", lambda s: s.reset_replay_marks(connection))

    async def register_pending_replays(self, items: Sequence[PendingReplay]) -> None:
        await self._call("register_pending_replays", lambda s: s.register_pending_replays(items))

    async def take_pending_replay(self, topic: str, digest: str) -> str | None:
        return await self._call("take_pending_replay", lambda s: s.take_pending_replay(topic, digest))

    async def purge_expired(self, limit: int) -> int:
        return await self._call("purge_expired", lambda s: s.purge_expired(limit))

    async def ping(self) -> None:
        # not counted as a failure: readiness reports a failing ping (backend_up)
        await self._check().ping()
