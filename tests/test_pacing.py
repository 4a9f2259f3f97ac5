"""AdaptiveLimit: how many background jobs may start while hook calls keep the service busy.
The samples are fed by hand (a sampler that never samples), so nothing depends on timing."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from exhook.pacing import AdaptiveLimit, LoopLag


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


async def test_a_flood_of_connect_hooks_stops_new_jobs_until_it_ebbs() -> None:
    limit = limit_of(initial=2)
    loop = asyncio.get_running_loop()
    assert start(limit)
    limit._sampled_at = loop.time() - 0.1  # 100 ms since the last sample: 50 connects = 500/s
    for _ in range(50):
        limit.note_connect()
    limit.on_sample(0.0)
    assert limit.limit == 0 and not start(limit)
    limit._sampled_at = loop.time() - 0.1  # no connects for 100 ms
    limit.on_sample(0.0)
    assert limit.limit == 2 and start(limit)
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
