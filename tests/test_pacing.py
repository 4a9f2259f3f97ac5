"""AdaptiveLimit: how many background jobs may start while hook calls keep the service busy.
The samples are fed by hand (a sampler that never samples), so nothing depends on timing."""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import Callable
from typing import Any

from exhook.pacing import AdaptiveLimit, ConnectCount, LoopLag


class HandFed(LoopLag):
    async def run(self, on_sample: Callable[[float], None]) -> None:
        await asyncio.Event().wait()


def limit_of(**kw: float) -> AdaptiveLimit:
    return AdaptiveLimit(maximum=5, target_lag_s=0.01, busy_connects_per_s=100, sampler=HandFed(), **kw)


def start(limit: AdaptiveLimit, waited_s: float = 0.0) -> bool:
    if limit.may_start(waited_s):
        limit.started()
        return True
    return False


async def test_starts_with_initial_slots_and_adds_one_per_job_finished_while_not_busy() -> None:
    limit = limit_of(initial=1)
    assert start(limit)
    assert not start(limit)
    limit.finished()
    assert limit.limit == 2
    assert start(limit) and start(limit) and not start(limit)
    for _ in range(10):
        limit.finished()
        start(limit)
    assert limit.limit == 5  # never above the maximum
    limit.finished()
    limit.finished()
    limit.idle()
    assert start(limit) and limit.limit == 1  # after a quiet spell it starts afresh
    await limit.close()


async def test_a_late_timer_stops_new_jobs_until_the_loop_keeps_up_again() -> None:
    limit = limit_of(initial=2)
    assert start(limit)
    limit.on_sample(0.05)
    assert limit.limit == 0 and not start(limit)
    limit.finished()  # finishing while busy gives no slot back
    assert not start(limit)
    limit.on_sample(0.007)  # better, not yet good
    assert not start(limit)
    limit.on_sample(0.001)
    assert limit.limit == 2 and start(limit) and start(limit) and not start(limit)
    await limit.close()


class HandClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def sample_every_5_ms(limit: AdaptiveLimit, clock: HandClock, samples: int, connects_each: int) -> None:
    for _ in range(samples):
        clock.now += 0.005
        for _ in range(connects_each):
            limit.note_connect()
        limit.on_sample(0.0)


async def test_a_flood_of_connect_hooks_stops_new_jobs_until_it_ebbs() -> None:
    clock = HandClock()
    limit = limit_of(initial=2, clock=clock)
    assert start(limit)
    clock.now += 0.1  # one sample after 100 ms: 50 connects = 500/s
    for _ in range(50):
        limit.note_connect()
    limit.on_sample(0.0)
    assert limit.limit == 0 and not start(limit)
    clock.now += 0.1  # no connects for 100 ms
    limit.on_sample(0.0)
    assert limit.limit == 2 and start(limit)
    await limit.close()


async def test_the_end_of_a_flood_is_seen_within_the_rate_window() -> None:
    clock = HandClock()
    limit = limit_of(initial=2, clock=clock)
    assert start(limit)
    sample_every_5_ms(limit, clock, 200, 10)  # a second of 2,000 connect hooks a second
    assert limit.limit == 0
    sample_every_5_ms(limit, clock, 9, 0)  # 45 ms without: the window still holds some
    assert limit.limit == 0
    sample_every_5_ms(limit, clock, 2, 0)  # past the window
    assert limit.limit == 2 and start(limit)
    sample_every_5_ms(limit, clock, 20, 0)
    # a trickle below half of busy_connects_per_s (one connect each 25 ms = 40/s) lets jobs go
    for _ in range(20):
        clock.now += 0.025
        limit.note_connect()
        limit.on_sample(0.0)
    assert limit.limit == 2
    await limit.close()


async def test_a_service_that_never_stops_being_busy_still_runs_the_oldest_job_after_the_pause() -> None:
    limit = limit_of(max_pause_s=10.0)
    assert start(limit)
    limit.on_sample(0.05)
    limit.finished()
    assert not start(limit, waited_s=9.9)
    assert start(limit, waited_s=10.0)
    assert not start(limit, waited_s=20.0)  # one at a time
    await limit.close()


async def test_every_sample_tells_the_owner_there_may_be_room() -> None:
    limit = limit_of()
    calls: list[int] = []
    limit.on_room = lambda: calls.append(limit.limit)
    start(limit)
    limit.on_sample(0.05)
    limit.on_sample(0.0)
    assert calls == [0, 4]
    await limit.close()


def _connect_flood(slots: Any, index: int, connects: int) -> None:
    count = ConnectCount(slots, index)
    for _ in range(connects):
        count.add()


async def test_a_flood_at_another_worker_stops_new_jobs_here() -> None:
    """Workers share the count (the supervisor's array): one of them answering a flood
    of connects holds back every worker's background work (they may share a CPU)."""
    ctx = multiprocessing.get_context("spawn")
    slots = ctx.RawArray("Q", 2)
    clock = HandClock()
    here = limit_of(initial=2, clock=clock, connects=ConnectCount(slots, 0))
    assert start(here)
    other = ctx.Process(target=_connect_flood, args=(slots, 1, 50))
    other.start()
    await asyncio.to_thread(other.join, 30)
    assert other.exitcode == 0
    clock.now += 0.1  # 50 connects at the other worker in 100 ms: 500/s
    here.on_sample(0.0)
    assert here.limit == 0 and not start(here)
    clock.now += 0.1
    here.on_sample(0.0)
    assert here.limit == 2 and start(here)
    # busy_connects_per_s (100) is per worker: 8 connects at each of the 2 in 100 ms (160/s in
    # all) is not busy, nor quiet (over half the rate: the limit stays); 4 at each is quiet;
    # 15 at one of them (150/s there, none here) is busy
    for here_n, other_n, limit in ((8, 8, 2), (4, 4, 2), (0, 15, 0), (0, 4, 2)):
        slots[0], slots[1] = slots[0] + here_n, slots[1] + other_n
        clock.now += 0.1
        here.on_sample(0.0)
        assert here.limit == limit, (here_n, other_n)
    await here.close()
