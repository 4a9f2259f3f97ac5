"""The broker's ``session.subscribed`` calls for the filters a restore gives back, so
that each restored filter is replayed once, after its subscription exists (issue 14).

EMQX fires ``session.subscribed`` once the route exists (the facts: after the route is
added, before SUBACK; for a REST subscribe too). The broker routes a published message
only once its ``message.publish`` is answered, and the service answers once the message
is stored, or once it is in the spool when the store is slow. So a replay that reads its
upper bounds after that call has arrived, while this process's spool is drained, misses
nothing: a message answered before the read is in its range, and one answered later is
routed to the subscription by the broker itself. Hence:

- a restore waits a short while for the calls of the filters it gave back before it
  replays them: a replay started earlier can reach nobody (the broker applies a REST
  subscribe only when the client's process gets to it) and has to be tried again;
- a filter the restore replayed in full, after its call had arrived and with nothing
  waiting in the spool, is noted as *covered*: that call's own job then stores nothing new
  and need not replay it a second time (the store calls of a replay's start: latest
  positions and claim, and the list of stored topics for a wildcard filter).

At most ``max_turns`` restores (256) are between their subscribe and the end of that
wait at once; the others wait for a turn (no slot of the client queues while they do).
A restore gives its turn back as soon as that wait ends, before it waits for its slot
again, and for each pause between the tries of a subscribe that failed (mostly a 404:
the client is not registered yet, or left, and is asked for seconds).
grpc.aio takes in the calls of one method one at a time, each a hand-over to the event
loop, so a burst of them queues in front of the process. In a reconnect storm the
restores sent subscribes faster than their calls were taken in (~250 a second on a
loaded 2-core host): the broker's ``session.subscribed`` calls waited 0.9-1.5 s (p50)
and 2.0-3.1 s (p99) for an answer, holding each client's process at the broker that
long, closer and closer to its 5 s ``request_timeout`` as the storm grows; a restore
that gave up waiting after 2 s replayed anyway, and the call's own job then claimed the
filter again. With 256 turns those answers took 0.6-1.0 s (p50) and 0.9-1.4 s (p99) at
the same restore rate; 64 turns cut them to 0.2-0.3 s but held the rate to what the
calls are taken in at (2,000 clients: ~15% fewer restored a second).

A call that never comes (lost in a storm) costs its restore the wait, and the restore
then replays as if it had not waited; the replay marks still keep a later replay of the
same filter from sending anything twice. Only connections whose restore this process
started are tracked, per connection key, and forgotten when a connect hook with that key
reaches this process again (EMQX 5.3 sends no peer port, so a reconnect from one host
reuses the key). Another instance's spool is out of sight here, as it is for every replay.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

from exhook.client_queue import outside_slot
from exhook.expiring import ExpiringMap
from exhook.topics import filter_key

# the calls noted per connection (a broker sending endless filters for one client must
# not grow it without end; a call not noted only costs a restore its wait)
_FILTERS_PER_CONNECTION = 1000
# restores at once between their subscribe and the broker's calls (see above)
MAX_TURNS = 256


class _Connection:
    """Filters by ``filter_key``: a connection's sets stay small however long they are."""

    __slots__ = ("arrived", "covered", "wanted", "complete")

    def __init__(self) -> None:
        self.arrived: set[bytes] = set()
        self.covered: set[bytes] = set()
        # while a restore waits: the filters it waits for, and what wakes it
        self.wanted: frozenset[bytes] = frozenset()
        self.complete: asyncio.Event | None = None


class Turn:
    """A restore's turn (``SubscribedCalls.turn``)."""

    __slots__ = ("_turns", "held")

    def __init__(self, turns: asyncio.Semaphore) -> None:
        self._turns = turns
        self.held = False

    async def take(self) -> None:
        """Wait for a turn outside the job's slot; one that cannot step out takes a free
        turn or goes on without one (see ``SubscribedCalls.turn``)."""
        async with outside_slot() as free:
            await self._acquire(free)

    async def sleep(self, seconds: float) -> None:
        """A pause between the tries of a subscribe whose client is not registered yet
        (a 404, or a try that failed): the turn goes to another restore meanwhile (a
        client that left would hold it for seconds), and is taken again, outside the
        slot, for the next try."""
        self.release()
        async with outside_slot() as free:
            await asyncio.sleep(seconds)
            await self._acquire(free)

    def release(self) -> None:
        """Give the turn back now (again: nothing): a restore whose wait for the calls
        is over gives it back before it waits for its slot again, so that this wait for a
        slot does not keep a turn from the next restore."""
        if self.held:
            self.held = False
            self._turns.release()

    async def _acquire(self, free: bool) -> None:
        if free or not self._turns.locked():
            await self._turns.acquire()
            self.held = True


class SubscribedCalls:
    def __init__(self, ttl_s: float, max_connections: int, max_turns: int = MAX_TURNS) -> None:
        self._connections: ExpiringMap[str, _Connection] = ExpiringMap(ttl_s, max_connections)
        self._turns = asyncio.Semaphore(max_turns)

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[Turn]:
        """A restore's turn to subscribe its client and wait for the broker's calls:
        at most ``max_turns`` at once. A restore waits for its turn outside its slot of
        the client queues; one that cannot step out (a thousand jobs are out already, or
        it runs in a task its job started) takes a free turn or goes on without one:
        waiting in its slot, it could keep a restore that holds a turn from the slot it
        needs to finish. The turn ends with the block, or earlier by ``Turn.release``."""
        turn = Turn(self._turns)
        try:
            await turn.take()
            # (released also when the job is cancelled while it waits for its slot again)
            yield turn
        finally:
            turn.release()

    def arrived(self, connection: str, topic: str) -> None:
        """The broker's ``session.subscribed`` for ``topic`` reached this process."""
        entry, key = self._entry(connection), filter_key(topic)
        if key not in entry.arrived and len(entry.arrived) >= _FILTERS_PER_CONNECTION:
            return
        entry.arrived.add(key)
        if entry.complete is not None and entry.wanted <= entry.arrived:
            entry.complete.set()

    def forget(self, connection: str) -> None:
        """A new connect with this key: what an earlier connection saw does not count,
        and a restore of it still waiting for calls stops waiting."""
        entry = self._connections.pop(connection)
        if entry is not None and entry.complete is not None:
            entry.complete.set()

    def missing(self, connection: str, topics: Sequence[str]) -> list[str]:
        """The filters of ``topics`` whose call has not arrived yet."""
        entry = self._connections.get(connection)
        arrived = entry.arrived if entry is not None else set()
        return [t for t in topics if filter_key(t) not in arrived]

    async def wait(self, connection: str, topics: Sequence[str], timeout_s: float) -> list[str]:
        """Until the calls of all ``topics`` have arrived, the connection is forgotten,
        or ``timeout_s``; the filters whose call has still not arrived."""
        if not self.missing(connection, topics):
            return []
        entry = self._entry(connection)
        complete = entry.complete = asyncio.Event()
        entry.wanted = frozenset(map(filter_key, topics))
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await complete.wait()
        finally:
            if entry.complete is complete:
                entry.complete, entry.wanted = None, frozenset()
        return self.missing(connection, topics)

    def cover(self, connection: str, topic: str) -> None:
        entry = self._connections.get(connection)
        if entry is not None:
            entry.covered.add(filter_key(topic))

    def take_covered(self, connection: str, topic: str) -> bool:
        """Whether a restore already replayed ``topic`` for this connection after its
        call arrived (forgotten now: a later subscribe of the filter replays as usual)."""
        entry, key = self._connections.get(connection), filter_key(topic)
        if entry is None or key not in entry.covered:
            return False
        entry.covered.discard(key)
        return True

    def _entry(self, connection: str) -> _Connection:
        entry = self._connections.get(connection)
        if entry is None:
            entry = _Connection()
            self._connections.put(connection, entry)
        return entry
