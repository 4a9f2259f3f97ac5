"""An in-memory ``Store`` with the semantics the interface documents (storage/base.py),
for fast unit tests of the hook logic and the replayer. Every call is recorded in
``calls`` so a test can tell which store round trips a path made. The real
backends are tested against the same semantics in their own tests."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace

from storage.base import Store, WriteRejected
from storage.merge import Source, merged_pages
from storage.model import (
    DeleteMessage,
    DropPendingReplay,
    PendingReplay,
    RekeyMessage,
    SaveMessage,
    StoredMessage,
    Subscription,
    WriteOp,
)


class MemoryStore(Store):
    name = "memory"

    def __init__(self) -> None:
        self.messages: dict[str, StoredMessage] = {}
        self.subs: dict[str, dict[str, int]] = {}
        self.marks: dict[str, dict[str, float]] = {}
        self.tombstones: set[str] = set()
        self.pending: dict[tuple[str, str], deque[str]] = {}
        self.calls: list[str] = []
        self.writes: list[list[WriteOp]] = []  # the ops of each write call
        self.refuse_clientids: set[str] = set()  # subscriptions the store cannot hold
        self._positions = itertools.count(1)

    async def open(self) -> None:
        self.calls.append("open")

    async def close(self) -> None:
        self.calls.append("close")

    async def ping(self) -> None:
        self.calls.append("ping")

    async def write(self, ops: Sequence[WriteOp]) -> None:
        self.calls.append("write")
        self.writes.append(list(ops))
        for op in ops:
            self._apply(op)

    def _apply(self, op: WriteOp) -> None:
        if isinstance(op, SaveMessage):
            if op.message.msgid not in self.messages:
                self.messages[op.message.msgid] = replace(op.message, position=float(next(self._positions)))
        elif isinstance(op, DeleteMessage):
            if op.replay_ack:
                self.tombstones.add(op.msgid)
            self.messages.pop(op.msgid, None)
        elif isinstance(op, RekeyMessage):
            moved = self.messages.pop(op.old_id, None)
            if moved is not None and op.new_id not in self.tombstones:
                self.messages[op.new_id] = replace(moved, msgid=op.new_id)
        elif isinstance(op, DropPendingReplay):
            ids = self.pending.get((op.topic, op.digest))
            if ids and op.msgid in ids:
                ids.remove(op.msgid)

    async def save_subscription(self, clientid: str, topic: str, qos: int) -> None:
        self.calls.append("save_subscription")
        if clientid in self.refuse_clientids:
            raise WriteRejected("too_long", f"clientid {clientid!r} is longer than the column allows")
        self.subs.setdefault(clientid, {})[topic] = qos

    async def delete_subscription(self, clientid: str, topic: str) -> None:
        self.calls.append("delete_subscription")
        self.subs.get(clientid, {}).pop(topic, None)

    async def subscriptions(self, clientid: str) -> list[Subscription]:
        self.calls.append("subscriptions")
        return [Subscription(t, q) for t, q in sorted(self.subs.get(clientid, {}).items())]

    async def stored_topics(self, pattern_prefix: str) -> list[str]:
        self.calls.append("stored_topics")
        return sorted({m.topic for m in self.messages.values() if m.topic.startswith(pattern_prefix)})

    async def latest_positions(self, topics: Sequence[str]) -> dict[str, float]:
        self.calls.append("latest_positions")
        out: dict[str, float] = {}
        for m in self.messages.values():
            if m.topic in topics:
                out[m.topic] = max(out.get(m.topic, 0.0), m.position)
        return out

    async def count_messages(self, topics: Sequence[str]) -> dict[str, int]:
        self.calls.append("count_messages")
        out: dict[str, int] = {}
        for m in self.messages.values():
            if m.topic in topics:
                out[m.topic] = out.get(m.topic, 0) + 1
        return out

    async def read_messages(self, ranges: dict[str, tuple[float | None, float]],
                            page_size: int) -> AsyncIterator[list[StoredMessage]]:
        self.calls.append("read_messages")
        sources = [Source[StoredMessage](topic) for topic in ranges]

        async def refill(dry: list[Source[StoredMessage]]) -> None:
            for source in dry:
                low, high = ranges[source.topic]
                source.buffer.extend(sorted(
                    (m for m in self.messages.values()
                     if m.topic == source.topic and (low is None or m.position > low) and m.position <= high),
                    key=lambda m: m.position))
                source.exhausted = True

        async for page in merged_pages(sources, refill, lambda m: m.position, page_size):
            yield [m for m, _ in page]

    async def claim_replay(self, connection: str, highs: dict[str, float]) -> dict[str, float | None]:
        self.calls.append("claim_replay")
        marks = self.marks.setdefault(connection, {})
        previous: dict[str, float | None] = {t: marks.get(t) for t in highs}
        for topic, high in highs.items():
            marks[topic] = max(marks.get(topic, high), high)
        return previous

    async def reset_replay_marks(self, connection: str) -> None:
        self.calls.append("reset_replay_marks")
        self.marks.pop(connection, None)

    async def register_pending_replays(self, items: Sequence[PendingReplay]) -> None:
        self.calls.append("register_pending_replays")
        for item in items:
            self.pending.setdefault((item.topic, item.digest), deque()).append(item.msgid)

    async def take_pending_replay(self, topic: str, digest: str) -> str | None:
        self.calls.append("take_pending_replay")
        ids = self.pending.get((topic, digest))
        return ids.popleft() if ids else None

    async def purge_expired(self, limit: int) -> int:
        self.calls.append("purge_expired")
        return 0

    def stored(self, topic: str | None = None) -> list[StoredMessage]:
        return sorted((m for m in self.messages.values() if topic is None or m.topic == topic),
                      key=lambda m: m.position)
