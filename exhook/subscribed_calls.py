"""The broker's ``session.subscribed`` calls for the filters a restore gives back, so
that each restored filter is replayed once, after its subscription exists (issue 14).

EMQX fires ``session.subscribed`` once the route exists (the facts: after the route is
added, before SUBACK; for a REST subscribe too). A replay that reads its upper bounds
after that call has arrived misses nothing: a message stored before the read is in its
range, and one stored later is routed to the subscription by the broker itself (the
broker routes a message only once ``message.publish`` is answered, and the service
answers once it is stored). So:

- a restore waits a short while for the calls of the filters it gave back before it
  replays them: a replay started earlier can reach nobody (the broker applies a REST
  subscribe only when the client's process gets to it) and has to be tried again;
- a filter the restore replayed completely after its call had arrived is noted as
  *covered*: that call's own job then stores nothing new and need not replay it a
  second time (two store round trips per restored filter: latest positions, claim).

A call that never comes (lost in a storm) costs its restore the wait, and the restore
then replays as if it had not waited; the replay marks still keep a later replay of the
same filter from sending anything twice. Everything here is per connection key and
dropped when that key connects again (EMQX 5.3 sends no peer port, so a reconnect from
one host reuses the key).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

from exhook.expiring import ExpiringMap

# the calls noted per connection (a broker sending endless filters for one client must
# not grow it without end; a call not noted only costs a restore its wait)
_FILTERS_PER_CONNECTION = 1000


class SubscribedCalls:
    def __init__(self, ttl_s: float, max_connections: int) -> None:
        # connection -> filter -> set once its session.subscribed call has arrived
        self._arrived: ExpiringMap[str, dict[str, asyncio.Event]] = ExpiringMap(ttl_s, max_connections)
        # connection -> filters a restore replayed completely after their call arrived
        self._covered: ExpiringMap[str, set[str]] = ExpiringMap(ttl_s, max_connections)

    def arrived(self, connection: str, topic: str) -> None:
        """The broker's ``session.subscribed`` for ``topic`` reached this process."""
        events = self._arrived.get(connection)
        if events is not None and topic not in events and len(events) >= _FILTERS_PER_CONNECTION:
            return
        self._event(connection, topic).set()

    def forget(self, connection: str) -> None:
        """A new connect with this key: what an earlier connection saw does not count."""
        self._arrived.pop(connection)
        self._covered.pop(connection)

    def missing(self, connection: str, topics: Sequence[str]) -> list[str]:
        """The filters of ``topics`` whose call has not arrived yet."""
        events = self._arrived.get(connection) or {}
        return [t for t in topics if not ((event := events.get(t)) and event.is_set())]

    async def wait(self, connection: str, topics: Sequence[str], timeout_s: float) -> None:
        """Until the calls of all ``topics`` have arrived, or ``timeout_s``."""
        events = [self._event(connection, t) for t in topics]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                for event in events:
                    await event.wait()

    def cover(self, connection: str, topic: str) -> None:
        covered = self._covered.get(connection)
        if covered is None:
            covered = set()
            self._covered.put(connection, covered)
        covered.add(topic)

    def take_covered(self, connection: str, topic: str) -> bool:
        """Whether a restore already replayed ``topic`` for this connection after its
        call arrived (forgotten now: a later subscribe of the filter replays as usual)."""
        covered = self._covered.get(connection)
        if covered is None or topic not in covered:
            return False
        covered.discard(topic)
        return True

    def _event(self, connection: str, topic: str) -> asyncio.Event:
        events = self._arrived.get(connection)
        if events is None:
            events = {}
            self._arrived.put(connection, events)
        event = events.get(topic)
        if event is None:
            event = events[topic] = asyncio.Event()
        return event
