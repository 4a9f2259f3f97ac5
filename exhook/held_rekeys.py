"""Re-keys held back for a moment, so that most of them never reach the store.

The broker publishes a replayed message under a new id, and the service re-keys the
stored copy to it (``RekeyMessage``) so that the subscriber's ack, which names the
new id, deletes it. That ack usually comes within milliseconds, to this same
process. Holding the re-key back for ``hold_s`` lets the ack replace the pair with
one delete of the stored id: one store write per replayed message instead of two.

Why holding is safe:
- nobody waits for a re-key (the replay's own ``message.publish`` is answered at once);
- an ack that reaches another process first deletes the new id and leaves a
  tombstone, which the late re-key honours (``storage``: the moved copy is deleted);
- a replay that reads a held message again (a new connection of the client, another
  subscriber) publishes it under one more new id: its re-key joins the same stored
  id's group, and an ack of any id of the group deletes the stored copy once. Left
  unacked, the group goes to the writer in order, as the re-keys would have without
  holding. A replay that retries after reaching nobody flushes them first (it waits
  for the writer to catch up, so that it reads the ids the broker gave);
- a crash loses held re-keys as it loses the writer's queue: the copy keeps its old
  id, the ack then deletes nothing, and the message is replayed once more later (at
  least once, never lost). Shutdown flushes them into the writer, which drains.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable

from storage.model import RekeyMessage

# long enough for the ack of a replay delivered at once (a few ms, more in a storm),
# far shorter than the tombstone an ack leaves for a late re-key (TOMBSTONE_TTL_S)
HOLD_S = 1.0
# beyond this many held re-keys the oldest go to the writer at once (memory bound)
MAX_HELD = 100_000


class HeldRekeys:
    def __init__(self, submit: Callable[[RekeyMessage], None], hold_s: float | None = None,
                 max_held: int = MAX_HELD) -> None:
        self._submit = submit
        self._hold = HOLD_S if hold_s is None else hold_s
        self._max = max_held
        self._held: OrderedDict[str, tuple[float, RekeyMessage]] = OrderedDict()  # by new id, oldest first
        self._by_old: dict[str, list[str]] = {}  # stored id -> the new ids of its held re-keys
        self._added = asyncio.Event()

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, op: RekeyMessage) -> None:
        """Hold ``op`` back; it goes to the writer after ``hold_s`` unless acked first."""
        if op.new_id in self._held:  # the same re-key again: it keeps its place
            return
        self._held[op.new_id] = (asyncio.get_running_loop().time() + self._hold, op)
        self._by_old.setdefault(op.old_id, []).append(op.new_id)
        while len(self._held) > self._max:
            self._send_oldest()
        self._added.set()

    def acked(self, new_id: str) -> RekeyMessage | None:
        """The held re-key to ``new_id``, taken back with every other held re-key of
        the same stored message (the caller deletes its stored id instead: an ack of
        any replay of a message consumes it), or None if there is none (not a replay
        of this process, or already sent to the writer)."""
        held = self._held.get(new_id)
        if held is None:
            return None
        op = held[1]
        for other in self._by_old.pop(op.old_id):
            del self._held[other]
        return op

    def flush(self) -> None:
        """Send every held re-key to the writer now, oldest first."""
        while self._held:
            self._send_oldest()

    async def run(self) -> None:
        """Send each re-key to the writer once its time is up (run it as a supervised
        task; ``flush`` after it is stopped)."""
        loop = asyncio.get_running_loop()
        while True:
            if not self._held:
                self._added.clear()
                await self._added.wait()
                continue
            due = self._oldest_due()
            if due > loop.time():
                await asyncio.sleep(due - loop.time())
                continue
            now = loop.time()
            while self._held and self._oldest_due() <= now:
                self._send_oldest()

    def _oldest_due(self) -> float:
        return next(iter(self._held.values()))[0]

    def _send_oldest(self) -> None:
        new_id, (_, op) = self._held.popitem(last=False)
        group = self._by_old[op.old_id]
        group.remove(new_id)  # the oldest of its group: first in the list
        if not group:
            del self._by_old[op.old_id]
        self._submit(op)
