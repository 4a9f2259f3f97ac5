"""Where everything lives: the Erlang plugin's keys, this service's keys, the score.

Layout (``emqx_offline_messages`` 2.0.0 = emqx/emqx-offline-message-plugin
``009922bad5836dc97caf216ea0a0bf8e6f5c0a39`` = emqx/emqx
``5db93903ccdccbb3c671500a2b55045d8d8a60f4`` ``plugins/emqx_offline_messages``;
see docs/plugin-2.0.0-notes.md)::

    {mp}:{b62id}    hash  id=b62id from qos topic payload(raw bytes) ts(ms) retain=true|false
                          EXPIRE message_ttl (none when message_ttl = 0)
    {mp}:{topic}    zset  member = b62id, score = arrival time in ms (a float)
    {sp}:{clientid} hash  topic -> qos

    mp = message_key_prefix, sp = subscription_key_prefix, b62id = storage.base62.msgid_to_b62

Score (= ``StoredMessage.position``). The plugin 2.0.0 scores a message with its
arrival time in milliseconds as a float (``system_time(native)`` / native units per
ms), trims ``ZREMRANGEBYSCORE {mp}:{topic} -inf (now_ms - ttl*1000)`` on every
publish and, reading, keeps members whose score is ``> now_ms - ttl*1000`` (the
score is parsed as a float, or as an integer). Plugin versions before 2.0.0 scored
with the *expiry* time (``now + ttl``, integer); 2.0.0 does not, and neither do we.
Our score is the same clock, finer: the broker GUID's first 64 bits are its
creation time in microseconds, so the score is ``guid_us / 1000`` (distinct and
publish-ordered within a millisecond); a GUID more than a day away from our clock
falls back to our own time. Ties (equal scores) are read in GUID order.
``message_ttl = 0`` (keep until acknowledged): no EXPIRE, no trimming, the score
rule is unchanged, so a plugin configured with a ttl T reading the same store sees
the messages younger than T, and our reader sees all of them.

Keys of this service (never in the plugin's ``{mp}:`` namespace, which any topic
may take; ``{mp}~ox:`` is also outside a ``KEYS {mp}:*`` listing)::

    {mp}~ox:topics              zset, score 0, member = topic with stored messages
                                (``ZRANGE ... BYLEX`` on a literal prefix: wildcard replays)
    {mp}~ox:mark:{connection}   hash topic -> replay mark, EXPIRE REPLAY_MARK_TTL_S
    {mp}~ox:tomb:{b62id}        string, EX TOMBSTONE_TTL_S (ack of a replay)
    {mp}~ox:pend:{digest}:{topic} list of hex ids, EXPIRE PENDING_REPLAY_TTL_S (v2 replays)
    {mp}~ox:call:{tag}:{token}  hash, EXPIRE CALL_RECORD_TTL_S: one registry call ran (a
                                re-send of it changes nothing; bookkeeping.py)

A topic and a message share the ``{mp}:`` namespace (as in the plugin): a topic
spelled like a stored message's b62 id names that message's hash. Writes that meet
such a key of the wrong type are refused per op (``write.py``), never half-applied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from storage.config import RedisConfig

Cmd = tuple[Any, ...]

# the fields of a message hash, as the plugin writes and reads them
F_ID, F_FROM, F_QOS, F_TOPIC = b"id", b"from", b"qos", b"topic"
F_PAYLOAD, F_TS, F_RETAIN = b"payload", b"ts", b"retain"
TRUE, FALSE = b"true", b"false"

# Redis refuses a longer argument (its default ``proto-max-bulk-len``) with a protocol
# error and closes the connection, so such a value must never be sent.
MAX_BULK = 512 * 1024 * 1024

_GUID_SKEW_MS = 24 * 3600 * 1000.0  # a GUID timestamp further from our clock is not trusted


@dataclass(frozen=True, slots=True)
class Keys:
    """The key prefixes of one store (from its config; nothing learnt at open)."""

    messages: bytes  # b"{mp}:": message hashes and topic zsets (the plugin's)
    subscriptions: bytes  # b"{sp}:": subscription hashes (the plugin's)
    ours: bytes  # b"{mp}~ox:": this service's bookkeeping
    topics: bytes  # the topic index zset
    tombs: bytes
    marks: bytes
    pending: bytes
    calls: bytes  # records of registry calls (bookkeeping.py)

    @classmethod
    def of(cls, cfg: RedisConfig) -> Keys:
        ours = f"{cfg.message_key_prefix}~ox:".encode()
        return cls(
            messages=f"{cfg.message_key_prefix}:".encode(),
            subscriptions=f"{cfg.subscription_key_prefix}:".encode(),
            ours=ours,
            topics=ours + b"topics",
            tombs=ours + b"tomb:",
            marks=ours + b"mark:",
            pending=ours + b"pend:",
            calls=ours + b"call:",
        )

    def message(self, b62: bytes) -> bytes:
        return self.messages + b62

    def index(self, topic: str | bytes) -> bytes:
        """A topic's zset."""
        return self.messages + (topic.encode() if isinstance(topic, str) else topic)

    def tomb(self, b62: bytes) -> bytes:
        return self.tombs + b62

    def mark(self, connection: str) -> bytes:
        return self.marks + connection.encode()

    def pend(self, topic: bytes, digest: bytes) -> bytes:
        return self.pending + digest + b":" + topic

    def subscription(self, clientid: bytes) -> bytes:
        return self.subscriptions + clientid


def fmt(score: float) -> bytes:
    """A score as Redis parses it back to the same double."""
    return repr(score).encode()


def guid_score(msgid: str, now_ms: float) -> float:
    """Position of a new message: the GUID's microsecond timestamp in ms."""
    try:
        ms = int(msgid[:16], 16) / 1000.0
    except ValueError:
        return now_ms
    if len(msgid) != 32 or abs(ms - now_ms) > _GUID_SKEW_MS:
        return now_ms
    return ms


def expiry_deadline(ttl: int, now_ms: float) -> float | None:
    """Scores at or below this are expired (None: message_ttl = 0, nothing expires)."""
    return now_ms - ttl * 1000.0 if ttl > 0 else None


def live_min(deadline: float | None) -> bytes:
    """``ZRANGE BYSCORE`` lower bound of the live members."""
    return b"-inf" if deadline is None else b"(" + fmt(deadline)
