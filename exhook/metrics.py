"""Process-wide counters, logged on shutdown and readable by tests and the benchmark."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(slots=True)
class Metrics:
    messages_stored: int = 0
    publish_deadline_exceeded: int = 0
    publish_not_stored: int = 0
    replays_recognised: int = 0
    acks_queued: int = 0
    acks_dropped: int = 0
    store_failures: int = 0
    store_round_trips: int = 0
    store_ops: int = 0
    replayed_messages: int = 0
    replay_failures: int = 0
    restores: int = 0
    jobs_dropped: int = 0

    def snapshot(self) -> dict[str, int]:
        return asdict(self)
