"""Value types that cross the storage interface."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class StoredMessage:
    """One persisted QoS 1/2 message.

    ``msgid`` is the broker's GUID as 32 uppercase hex digits. ``position`` is the
    backend's arrival order key (Redis: index score, SQL: auto-increment id); it is
    stable when a message is re-keyed, so replay bookkeeping can rely on it.
    """

    msgid: str
    sender: str
    topic: str
    qos: int
    retain: bool
    payload: bytes
    timestamp: int
    position: float = 0.0


@dataclass(slots=True, frozen=True)
class SaveMessage:
    """Persist ``message`` (position is assigned by the backend)."""

    message: StoredMessage


@dataclass(slots=True, frozen=True)
class DeleteMessage:
    """Delete the message the broker acknowledged.

    ``replay_ack`` is true when the acked message was published through the REST
    API (``from == "http_api"``): it may be a replay whose re-key has not been
    written yet, so the backend leaves a short-lived tombstone for ``msgid``
    *before* deleting, and ``RekeyMessage`` honours it.
    """

    msgid: str
    topic: str
    replay_ack: bool = False


@dataclass(slots=True, frozen=True)
class RekeyMessage:
    """A replay of ``old_id`` passed ``message.publish`` with the new id ``new_id``.

    The stored message moves to ``new_id`` keeping its position, so the
    subscriber's ack (which carries ``new_id``) deletes it. If a tombstone for
    ``new_id`` exists (the ack came first), the message is deleted instead.
    """

    old_id: str
    new_id: str
    topic: str


@dataclass(slots=True, frozen=True)
class DropPendingReplay:
    """Remove one entry of the v2 pending-replay registry (``register_pending_replays``).

    The instance that published a replay recognises it in memory when it comes back
    through ``message.publish`` and answers at once, without a store round trip; the
    registry entry (kept for a replay that comes back to another instance) is then
    removed in the background, so it can never claim an unrelated publish.
    """

    topic: str
    digest: str
    msgid: str


WriteOp = SaveMessage | DeleteMessage | RekeyMessage | DropPendingReplay


@dataclass(slots=True, frozen=True)
class Subscription:
    topic: str
    qos: int


@dataclass(slots=True, frozen=True)
class PendingReplay:
    """A message about to be replayed, registered so that a v2 broker's
    ``message.publish`` (which carries no user properties) can be recognised."""

    topic: str
    digest: str
    msgid: str
