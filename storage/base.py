"""The one interface every backend implements.

Hook logic only ever talks to a ``Store``; it never knows which backend is behind it.
All methods raise ``StoreError`` (or a subclass) on backend failure; callers retry.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Sequence

from storage.model import PendingReplay, StoredMessage, Subscription, WriteOp


class StoreError(Exception):
    """A backend operation failed. ``retryable``: trying again may succeed (connection
    lost, timeout, deadlock, a read-only replica, the server restarting)."""

    retryable = True


class StoreConfigError(StoreError):
    """The backend is reachable but unusable as configured (missing table, ACL,
    bad credentials). Raised by ``open`` with one line naming the cause."""

    retryable = False


# Why a store refuses an op for good (the ``reason`` label of writes_rejected_total).
REJECT_REASONS = (
    "too_long",  # a value longer than its column (MySQL 1406, a varchar clientid or topic)
    "out_of_range",  # a number its column cannot hold (MySQL 1264, SQLite's 64-bit integers)
    "invalid_value",  # a value the column type refuses (MySQL 1292/1366, bad UTF-8)
    "constraint",  # NOT NULL, CHECK, foreign or unique key of the operator's schema
    "too_large",  # a payload beyond the column, the packet or the server's limit
    "invalid_id",  # a message id the key layout cannot hold (Redis: not a broker GUID)
    "wrong_type",  # the key exists with another type (Redis WRONGTYPE)
    "refused",  # any other refusal the server says is about this op's data
)


class WriteRejected(StoreError):
    """The store refuses one op for good: trying it again cannot help, and the other
    ops of its batch must still be written. ``index``: which op of the batch passed
    to ``write`` it is, when the backend knows (else the caller finds it by splitting
    the batch). ``reason`` is one of ``REJECT_REASONS``; ``detail`` the server's words."""

    retryable = False

    def __init__(self, reason: str, detail: str, index: int | None = None) -> None:
        super().__init__(detail)
        self.reason = reason if reason in REJECT_REASONS else "refused"
        self.detail = detail
        self.index = index


# How long replay bookkeeping lives in the store. A connection's replay marks
# outlive any realistic connection gap; tombstones and the v2 pending-replay
# registry only need to outlive one replay round trip.
REPLAY_MARK_TTL_S = 24 * 3600
TOMBSTONE_TTL_S = 600
PENDING_REPLAY_TTL_S = 600


class Store(abc.ABC):
    """Persistent messages, subscriptions and replay bookkeeping."""

    name: str = "store"

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect, create or verify schema, check permissions."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections. Buffered writes are flushed by the caller first."""

    # -- the ordered write path (group commit) --------------------------------
    @abc.abstractmethod
    async def write(self, ops: Sequence[WriteOp]) -> None:
        """Apply ``ops`` in order, in as few round trips as the backend allows.

        Returns once every op is durable. On failure nothing may be reported as
        written: the caller retries the whole batch, so every op is idempotent.
        ``WriteRejected`` means one op can never be written (the caller sets it aside
        and writes the rest); a backend checks what it can before the first round
        trip and then names the op by ``index``.
        """

    # -- subscriptions --------------------------------------------------------
    @abc.abstractmethod
    async def save_subscription(self, clientid: str, topic: str, qos: int) -> None: ...

    @abc.abstractmethod
    async def delete_subscription(self, clientid: str, topic: str) -> None: ...

    @abc.abstractmethod
    async def subscriptions(self, clientid: str) -> list[Subscription]: ...

    async def fresh_session_subscriptions(self, clientid: str, connection: str) -> list[Subscription]:
        """A client connected with a fresh session on ``connection``: return the client's
        subscriptions and forget that connection key's replay marks
        (``reset_replay_marks``: it gets everything stored again). A backend that can do
        both in one round trip does (a reconnect storm runs this once per client). The
        read goes first: a read that fails leaves the marks as they were (a caller that
        saw a failure cannot tell whether the reset ran after a read that did not fail)."""
        subscriptions = await self.subscriptions(clientid)
        await self.reset_replay_marks(connection)
        return subscriptions

    # -- replay reads ----------------------------------------------------------
    @abc.abstractmethod
    async def stored_topics(self, pattern_prefix: str) -> list[str]:
        """Distinct topics with stored messages whose name starts with
        ``pattern_prefix`` (the part of a wildcard filter before its first
        wildcard). Cost grows with the number of such topics, not messages."""

    @abc.abstractmethod
    async def latest_positions(self, topics: Sequence[str]) -> dict[str, float]:
        """Position of the newest stored message per topic (topics with none are
        left out)."""

    @abc.abstractmethod
    def read_messages(
        self, ranges: dict[str, tuple[float | None, float]], page_size: int
    ) -> AsyncIterator[list[StoredMessage]]:
        """Stored, unexpired messages of each topic with ``low < position <= high``
        (``low`` None = from the start), merged across topics in position order,
        yielded in pages of at most ``page_size``."""

    @abc.abstractmethod
    async def count_messages(self, topics: Sequence[str]) -> dict[str, int]:
        """Number of stored, unexpired messages per topic (topics with none are
        left out), for operators (``offline-exhook messages``/``purge``), without
        reading payloads."""

    # -- replay bookkeeping (shared by all instances through the store) --------
    @abc.abstractmethod
    async def claim_replay(
        self, connection: str, highs: dict[str, float]
    ) -> dict[str, float | None]:
        """Atomically raise this connection's replay mark of each topic to
        ``highs[topic]``; return the previous marks (None = never replayed).
        The caller replays only ``(previous, high]``, so two racing replays of one
        filter for one connection never deliver a message twice."""

    @abc.abstractmethod
    async def reset_replay_marks(self, connection: str) -> None:
        """Forget a connection's marks (a new connection replays again)."""

    @abc.abstractmethod
    async def register_pending_replays(self, items: Sequence[PendingReplay]) -> None:
        """Remember replays about to be published (for v2 brokers)."""

    @abc.abstractmethod
    async def take_pending_replay(self, topic: str, digest: str) -> str | None:
        """Pop the original id of a pending replay with this topic and payload
        digest, or None if this publish is not one of ours."""

    @abc.abstractmethod
    async def purge_expired(self, limit: int) -> int:
        """Delete at most ``limit`` messages older than ``message_ttl`` (and expired
        replay bookkeeping); return how many messages were deleted."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Cheap liveness check (readiness)."""
