"""Pacing of background work, so hook answers come first (issue 14).

Hook answers and background work (restores, replays, store reads, REST calls) share
one process: one event loop, and the interpreter lock with the store's worker threads
and grpc's completion-queue thread. Measured in a reconnect storm (10,000 concurrent
OnClientConnected calls, the service pinned to one CPU): with the restores running
next to the burst the answers took about twice as long as a no-op server's, without
them as long. The loop did not even lag then: grpc.aio takes one call of a method at
a time, each a hand-over between threads, and every thread that wants the lock or the
CPU in between slows that hand-over down; with a single job running the service took
in connects at a fifth of the rate.

So background jobs wait while the service is busy answering hooks, which it sees in
two ways: connect hooks (the ones holding a CONNACK) arriving faster than
``busy_connects_per_s`` at any of the service's workers (they share their counts:
``ConnectCount``), or the event loop running a timer later than
``target_lag_s`` (any flood of calls, or background work itself hogging the loop).
When that passes, jobs start again with ``initial`` slots (so that one slow job, a
REST call waiting for its timeout, does not hold up all others), and one more slot
for each job finished while the service keeps up, up to ``maximum`` (additive
increase; being busy again takes them all away). Jobs already running finish. So
that a service that is never idle cannot starve background work, the oldest waiting
job starts anyway once it has waited ``max_pause_s``, one at a time.

A job that only waits (for the broker to register its client) releases its slot for
the wait and asks for one again afterwards, like a new job.

The owner (``ClientQueues``) keeps the waiting jobs; this class only says whether one
more may start, and calls ``on_room`` when more might.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Protocol

# Connect hooks are counted over this last stretch of time. A window, not a moving
# average: a flood's rate (thousands a second) must read as over within the window of
# its end. An average took ~200 ms to decay below busy_connects_per_s, and in a
# reconnect storm every restore waited that long with the process idle.
RATE_WINDOW_S = 0.05


class _Slots(Protocol):
    def __getitem__(self, index: int) -> int: ...
    def __setitem__(self, index: int, value: int) -> None: ...
    def __len__(self) -> int: ...


class ConnectCount:
    """The connect hooks the service took, counted by all its workers: each adds to its
    own slot of ``slots`` (an array the supervisor shares with them; one writer per slot,
    so no lock) and reads them all. So a worker does not start background work while
    another one answers a flood: workers can share a CPU, and all share the store."""

    def __init__(self, slots: _Slots | None = None, index: int = 0) -> None:
        self._slots: _Slots = slots if slots is not None else [0]
        self._index = index

    def add(self) -> None:
        self._slots[self._index] += 1

    def counts(self) -> list[int]:
        """Each worker's count so far."""
        return [self._slots[i] for i in range(len(self._slots))]


class LoopLag:
    """Measures how late the event loop runs a timer, every ``interval_s``."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self._interval = interval_s

    async def run(self, on_sample: Callable[[float], None]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await asyncio.sleep(self._interval)
            on_sample(max(0.0, loop.time() - started - self._interval))


class AdaptiveLimit:
    """How many background jobs may run at once (see the module docstring). The lag is
    sampled only while jobs run or wait, so an idle service does not wake up every few
    milliseconds."""

    def __init__(self, initial: int = 4, maximum: int = 32, target_lag_s: float = 0.01,
                 busy_connects_per_s: float = 100.0, max_pause_s: float = 10.0,
                 sampler: LoopLag | None = None, clock: Callable[[], float] | None = None,
                 connects: ConnectCount | None = None) -> None:
        self.initial = min(initial, maximum)
        self.maximum = maximum
        self._target = target_lag_s
        self._connects = connects or ConnectCount()
        # per worker: any worker taking connects faster holds every worker back (a fleet
        # that connects steadily, spread over many workers, is not a flood)
        self._busy_rate = busy_connects_per_s
        self._max_pause = max_pause_s
        self._sampler = sampler or LoopLag()
        self._clock = clock
        self.on_room: Callable[[], None] = lambda: None
        self._limit = float(self.initial)
        self._running = 0
        self._lag = 0.0
        self._counted: list[int] = self._connects.counts()  # each worker's count at the last sample
        # the samples of the last RATE_WINDOW_S: (start, end, each worker's connect hooks in between)
        self._recent: deque[tuple[float, float, list[int]]] = deque()
        self._rate = 0.0  # connect hooks per second over the window, of the busiest worker
        self._sampled_at = 0.0
        self._sampling: asyncio.Task[None] | None = None

    @property
    def limit(self) -> int:
        return int(self._limit)

    @property
    def running(self) -> int:
        return self._running

    def may_start(self, waited_s: float) -> bool:
        """May one more job start? ``waited_s``: how long the oldest waiting job waited."""
        self._start_sampling()
        allowed = int(self._limit)
        if allowed == 0 and waited_s >= self._max_pause:
            allowed = 1  # never starve: the oldest job goes, one at a time
        return self._running < allowed

    def started(self) -> None:
        self._running += 1

    def released(self) -> None:
        """A running job gave its slot up for a wait; it asks again (``may_start``,
        ``started``) to go on. No slot more for it: a wait is not a finished job."""
        self._running -= 1

    def finished(self) -> None:
        self._running -= 1
        if self._limit >= 1 and not self._busy(0.5):
            self._limit = min(float(self.maximum), self._limit + 1)

    def idle(self) -> None:
        """Nothing runs or waits: stop sampling until there is work again."""
        if self._sampling is not None:
            self._sampling.cancel()
            self._sampling = None

    def note_connect(self) -> None:
        """A hook that holds a client's CONNACK arrived."""
        self._connects.add()

    def on_sample(self, lag_s: float) -> None:
        """A new lag sample (the sampler calls this)."""
        now = self._now()
        counts = self._connects.counts()
        self._recent.append((self._sampled_at, now, [c - c0 for c, c0 in zip(counts, self._counted, strict=True)]))
        self._sampled_at, self._counted = now, counts
        while len(self._recent) > 1 and self._recent[0][1] <= now - RATE_WINDOW_S:
            self._recent.popleft()
        span = max(RATE_WINDOW_S, now - self._recent[0][0])
        self._rate = max(map(sum, zip(*(deltas for _, _, deltas in self._recent), strict=True))) / span
        self._lag = lag_s
        if self._busy(1.0):
            self._limit = 0.0  # hook answers are waiting: start nothing new
        elif not self._busy(0.5) and self._limit < 1:
            self._limit = float(self.initial)  # keeping up again
        self.on_room()  # also lets the oldest job go once it has waited max_pause_s

    def _busy(self, factor: float) -> bool:
        return self._lag > self._target * factor or self._rate > self._busy_rate * factor

    def _now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    def _start_sampling(self) -> None:
        if self._sampling is None:
            loop = asyncio.get_running_loop()
            self._limit = float(self.initial)  # after a quiet spell, start afresh
            self._lag = self._rate = 0.0
            self._counted = self._connects.counts()
            self._recent.clear()
            self._sampled_at = self._now()
            self._sampling = loop.create_task(self._sampler.run(self.on_sample), name="loop-lag")

    async def close(self) -> None:
        task, self._sampling = self._sampling, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
