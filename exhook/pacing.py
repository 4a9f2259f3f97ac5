"""Pacing of background work, so hook answers come first (issue 14).

Hook answers and background work (restores, replays, store reads, REST calls) share
one event loop. Every callback waiting on the loop, a hook answer included, waits as
long as a timer fires late, so the loop's lag is what background work adds to the
broker's CONNACK and SUBACK times. ``AdaptiveLimit`` lets background jobs start
only while that lag stays small: it halves the number of jobs allowed to run when
the lag exceeds its target (a reconnect storm's burst of hook calls) and raises it
by one for each job finished while the loop keeps up (additive increase,
multiplicative decrease, like TCP's congestion window).
"""

from __future__ import annotations

import asyncio
from collections import deque


class LoopLag:
    """Samples how late the event loop runs a timer, while someone is interested."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self._interval = interval_s
        self.lag_s = 0.0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await asyncio.sleep(self._interval)
            self.lag_s = max(0.0, loop.time() - started - self._interval)


class AdaptiveLimit:
    """How many background jobs may run at once (see the module docstring).

    ``acquire`` waits in FIFO order for a slot; ``release`` gives it back. The lag
    sampler runs only while jobs are running or waiting, so an idle service does not
    wake up every few milliseconds.
    """

    def __init__(self, minimum: int = 2, maximum: int = 32, target_lag_s: float = 0.01,
                 sampler: LoopLag | None = None) -> None:
        self.minimum = minimum
        self.maximum = maximum
        self._target = target_lag_s
        self._sampler = sampler or LoopLag()
        self._limit = float(minimum)
        self._running = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._sampling: asyncio.Task[None] | None = None

    @property
    def limit(self) -> int:
        return int(self._limit)

    @property
    def running(self) -> int:
        return self._running

    async def acquire(self) -> None:
        self._start_sampling()
        self._adjust()
        if self._running < self.limit and not self._waiters:
            self._running += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot was handed over just before the cancel: pass it on
            else:
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        self._running -= 1
        self._adjust(finished=True)
        self._wake()
        if self._running == 0 and not self._waiters:
            self._stop_sampling()

    def _adjust(self, finished: bool = False) -> None:
        lag = self._sampler.lag_s
        if lag > self._target:
            # hook answers are waiting: back off at once (running jobs finish their step)
            self._limit = max(float(self.minimum), self._limit / 2)
            self._sampler.lag_s = 0.0  # one halving per late sample, not one per job
        elif finished and lag < self._target / 2:
            self._limit = min(float(self.maximum), self._limit + 1)

    def _wake(self) -> None:
        while self._waiters and self._running < self.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._running += 1
                waiter.set_result(None)

    def _start_sampling(self) -> None:
        if self._sampling is None:
            self._limit = float(self.minimum)  # after a quiet spell, start slowly again
            self._sampling = asyncio.create_task(self._sampler.run(), name="loop-lag")

    def _stop_sampling(self) -> None:
        if self._sampling is not None:
            self._sampling.cancel()
            self._sampling = None
            self._sampler.lag_s = 0.0

    async def close(self) -> None:
        task, self._sampling = self._sampling, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
