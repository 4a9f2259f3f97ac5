"""AdaptiveLimit: how many background jobs may run, driven by the event loop's lag.
The lag is set by hand here (a sampler that never samples), so nothing depends on timing."""

from __future__ import annotations

import asyncio

from exhook.pacing import AdaptiveLimit, LoopLag


class FixedLag(LoopLag):
    async def run(self) -> None:
        await asyncio.Event().wait()


async def finish_jobs(limit: AdaptiveLimit, n: int) -> None:
    for _ in range(n):
        await limit.acquire()
        limit.release()


async def test_starts_at_the_minimum_and_grows_by_one_per_job_finished_while_the_loop_keeps_up() -> None:
    limit = AdaptiveLimit(minimum=2, maximum=5, target_lag_s=0.01, sampler=FixedLag())
    await limit.acquire()  # a long job: the limit lives as long as some job runs or waits
    assert limit.limit == 2
    await finish_jobs(limit, 1)
    assert limit.limit == 3
    await finish_jobs(limit, 10)
    assert limit.limit == 5  # never above the maximum
    limit.release()
    await limit.acquire()  # after a quiet spell it starts slowly again
    assert limit.limit == 2
    limit.release()
    await limit.close()


async def test_halves_when_the_loop_lags_but_never_below_the_minimum() -> None:
    lag = FixedLag()
    limit = AdaptiveLimit(minimum=2, maximum=32, target_lag_s=0.01, sampler=lag)
    await limit.acquire()
    await finish_jobs(limit, 14)
    assert limit.limit == 16
    seen = []
    for _ in range(6):
        lag.lag_s = 0.05  # a late timer: hook answers are waiting
        await limit.acquire()
        seen.append(limit.limit)
        limit.release()
    assert seen[:2] == [8, 4]  # halved on each late sample (one job finished in between: +1)
    assert seen[-1] == 2
    limit.release()
    await limit.close()


async def test_jobs_over_the_limit_wait_in_order_and_start_as_slots_free() -> None:
    limit = AdaptiveLimit(minimum=1, maximum=1, sampler=FixedLag())
    started: list[int] = []
    began = [asyncio.Event() for _ in range(3)]
    holds = [asyncio.Event() for _ in range(3)]

    async def job(i: int) -> None:
        await limit.acquire()
        started.append(i)
        began[i].set()
        await holds[i].wait()
        limit.release()

    tasks = [asyncio.create_task(job(i)) for i in range(3)]
    await began[0].wait()
    assert started == [0] and limit.running == 1
    holds[0].set()
    await began[1].wait()
    assert started == [0, 1]
    holds[1].set()
    holds[2].set()
    await asyncio.gather(*tasks)
    assert started == [0, 1, 2] and limit.running == 0
    await limit.close()


async def test_a_cancelled_waiter_does_not_take_a_slot_with_it() -> None:
    limit = AdaptiveLimit(minimum=1, maximum=1, sampler=FixedLag())
    await limit.acquire()
    waiter = asyncio.create_task(limit.acquire())
    await asyncio.sleep(0)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    limit.release()
    await limit.acquire()  # the slot came back
    assert limit.running == 1
    limit.release()
    await limit.close()
