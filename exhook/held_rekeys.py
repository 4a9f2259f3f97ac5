"""Re-keys held back for a moment, so that most of them never reach the store.

The broker publishes a replayed message under a new id, and the service re-keys the
stored copy to it (``RekeyMessage``) so that the subscriber's ack, which names the
new id, deletes it. That ack usually comes within milliseconds, to this same
process. Holding the re-key back for ``hold_s`` (``exhook.replay_rekey_hold``, 1 s;
off with several workers) lets the ack replace the pair with one delete of the
stored id: one store write per replayed message instead of two.

Why holding is safe:
- nobody waits for a re-key (the replay's own ``message.publish`` is answered at once);
- an ack that reaches another process first deletes the new id and leaves a
  tombstone, which the late re-key honours (``storage``: the moved copy is deleted).
  Until then the acked copy stays readable, which is why several workers (or several
  instances, by configuration) hold nothing;
- a replay that reads a held message again (a new connection of the client, another
  subscriber) publishes it under one more new id: its re-key joins the same stored
  id's group, and an ack of any id of the group deletes the stored copy once. Left
  unacked, the group goes to the writer in order, as the re-keys would have without
  holding; once the first has gone (it moves the copy, the later ones find nothing to
  move), an ack of one still held deletes the copy where the first one moved it. A
  replay that retries after reaching nobody flushes those of its topics first (it
  waits for the writer to catch up, so that it reads the ids the broker gave);
- a crash loses held re-keys as it loses the writer's queue: the copy keeps its old
  id, the ack then deletes nothing, and the message is replayed once more later (at
  least once, never lost). Shutdown flushes them into the writer, which drains.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Collection

from storage.model import RekeyMessage

# beyond this many held re-keys the oldest go to the writer at once (memory bound)
MAX_HELD = 100_000


class HeldRekeys:
    """``hold_s`` 0: every re-key goes to the writer at once (several processes answer
    one broker: most acks reach another process, and holding would only keep acked
    copies readable for longer)."""

    def __init__(self, submit: Callable[[RekeyMessage], None], hold_s: float,
                 max_held: int = MAX_HELD) -> None:
        self._submit = submit
        self._hold = hold_s
        self._max = max_held
        self._held: OrderedDict[str, tuple[float, RekeyMessage]] = OrderedDict()  # by new id, oldest first
        self._by_old: dict[str, list[str]] = {}  # stored id -> the new ids of its held re-keys
        # topic -> the new ids of its held re-keys, oldest first (a flush of some topics
        # must not walk everything held: in a storm that is thousands, for each retry)
        self._by_topic: dict[str, dict[str, None]] = {}
        # stored id -> where the first of its re-keys sent to the writer moved it, while
        # others of that group are still held: their ack must delete the copy there
        self._moved: dict[str, str] = {}
        self._added = asyncio.Event()

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, op: RekeyMessage) -> None:
        """Hold ``op`` back; it goes to the writer after ``hold_s`` unless acked first."""
        if self._hold <= 0:
            self._submit(op)
            return
        if op.new_id in self._held:  # the same re-key again: it keeps its place
            return
        self._held[op.new_id] = (asyncio.get_running_loop().time() + self._hold, op)
        self._by_old.setdefault(op.old_id, []).append(op.new_id)
        self._by_topic.setdefault(op.topic, {})[op.new_id] = None
        while len(self._held) > self._max:
            self._send_oldest()
        self._added.set()

    def acked(self, new_id: str) -> str | None:
        """Take back the held re-key to ``new_id`` with every other held re-key of the
        same stored message (an ack of any replay of a message consumes it), and
        return the id the message is stored under, for the caller to delete: its
        stored id, or where a re-key of the group already sent moves it. None if no
        re-key to ``new_id`` is held (not a replay of this process, or sent already)."""
        held = self._held.get(new_id)
        if held is None:
            return None
        old_id = held[1].old_id
        for other in self._by_old.pop(old_id):
            self._forget_topic(self._held.pop(other)[1], other)
        return self._moved.pop(old_id, old_id)

    def flush(self, topics: Collection[str] | None = None) -> None:
        """Send the held re-keys (of ``topics``, or all) to the writer now, oldest first."""
        if topics is None:
            chosen = list(self._held)
        else:
            chosen = [new_id for topic in topics for new_id in self._by_topic.get(topic, ())]
        for new_id in chosen:
            self._send(new_id)

    async def run(self) -> None:
        """Send each re-key to the writer once its time is up (a supervised task;
        shutdown flushes what is still held)."""
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
        self._send(next(iter(self._held)))

    def _send(self, new_id: str) -> None:
        _, op = self._held.pop(new_id)
        self._forget_topic(op, new_id)
        group = self._by_old[op.old_id]
        group.remove(new_id)
        if group:
            # the first one sent moves the copy; later ones find nothing to move
            self._moved.setdefault(op.old_id, new_id)
        else:
            del self._by_old[op.old_id]
            self._moved.pop(op.old_id, None)
        self._submit(op)

    def _forget_topic(self, op: RekeyMessage, new_id: str) -> None:
        ids = self._by_topic[op.topic]
        del ids[new_id]
        if not ids:
            del self._by_topic[op.topic]
