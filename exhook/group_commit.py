"""When a partial batch should wait for company (adaptive group commit).

A store round trip costs the service far more CPU than an op in it (on the 2-core
dev machine ~250 µs against ~20 µs), so under load the writer must carry many ops
per round trip. But EMQX gives each client one ``message.publish`` in flight: a
client whose op is already in the batch cannot send another before its answer, so
waiting for it is pure latency. Like PostgreSQL's ``commit_delay`` with
``commit_siblings``, the batch waits only while *other* clients are active: those
that sent an op recently and have none in the batch. It waits for each next op at
most ``GAP_S`` and in all at most ``batch_time``, and stops as soon as every active
client has an op in it. A lone publisher never waits; with 256 the batch fills with
what arrives while the loop answers their calls. (A batch no caller waits for, acks
and re-keys only, waits for anyone's next op, each within ``GAP_S``, at most
``batch_time``: ``OrderedWriter._linger``.)
"""

from __future__ import annotations

import time
from collections.abc import Callable

from exhook.expiring import ExpiringMap

# An op arriving later than this after the previous one ends the wait. Calls reach
# the event loop in bursts (grpc hands them over one at a time from its own thread),
# so the gap must span a burst: measured with 256 clients on Redis, 1 ms ended 90% of
# the waits early (4 ops a round trip, 63% of the no-op's rate), 4 ms let them fill
# (8 ops, 79%); a lone publisher never waits at all.
GAP_S = 0.004
# A client is active while its last op is at most this old (much longer than one
# round trip of a busy client, much shorter than a human's pause).
ACTIVE_S = 0.05
_MAX_SOURCES = 100_000


class ActiveSources:
    """The clients (sources of ops) that sent one within ``window_s``."""

    def __init__(self, window_s: float = ACTIVE_S, clock: Callable[[], float] = time.monotonic) -> None:
        self._seen: ExpiringMap[str, bool] = ExpiringMap(window_s, _MAX_SOURCES, clock)

    def note(self, source: str) -> None:
        self._seen.put(source, True)

    def count(self) -> int:
        return len(self._seen)


def others_may_come(active: int, sources_in_batch: int) -> bool:
    """Is any active client not represented in the batch (it may send meanwhile)?"""
    return active > sources_in_batch
