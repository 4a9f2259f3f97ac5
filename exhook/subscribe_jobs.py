"""A client's ``session.subscribed`` and ``session.unsubscribed`` calls, queued as few jobs.

One SUBSCRIBE (or UNSUBSCRIBE) can carry thousands of filters, and EMQX makes one hook
call of each. Queued one job each, they would overflow the client's job queue (its
limit counts jobs) while an earlier job of the client runs (a restore waiting for its
REST call, a storm's pacing), and a filter whose job is dropped is never stored (or
never deleted: the next connect would give it back). So a call joins the client's last
queued job when that job is a batch of the same connect that has not started: the
order of the client's work is kept, and a batch is bounded (filters and bytes), so a
hostile client holds no more memory than before.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from storage.errors import one_line

log = logging.getLogger(__name__)

FILTERS_PER_JOB = 100
BYTES_PER_JOB = 1 << 16  # a longer filter still gets a job of its own


class SubscribeBatch:
    """One job: store (and replay) each subscribed filter and delete each unsubscribed
    one, in the order the calls came. An item's qos is None for an unsubscribe."""

    __slots__ = ("clientid", "connection", "connect", "items", "size", "_run")

    def __init__(self, clientid: str, connection: str, connect: int | None,
                 run: Callable[[str, int | None], Awaitable[None]]) -> None:
        self.clientid, self.connection, self.connect = clientid, connection, connect
        self.items: list[tuple[str, int | None]] = []
        self.size = 0
        self._run = run

    def take(self, connection: str, connect: int | None, topic: str, qos: int | None) -> bool:
        """Add a call of the same connection and connect, if the batch has room."""
        if connection != self.connection or connect != self.connect:
            return False
        if self.items and (len(self.items) >= FILTERS_PER_JOB or self.size + len(topic) > BYTES_PER_JOB):
            return False
        self.items.append((topic, qos))
        self.size += len(topic)
        return True

    async def __call__(self) -> None:
        for topic, qos in self.items:
            try:
                await self._run(topic, qos)
            except Exception as exc:  # one filter's failure does not cost the others theirs
                what = "subscribe" if qos is not None else "unsubscribe"
                log.error("client job failed: %s", one_line(exc), extra={
                    "event": "job_failed", "clientid": self.clientid[:200], "job": f"{what} {topic[:200]}"})
