from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from exhook.client_queue import ClientQueues, outside_slot, sleep_outside_slot
from exhook.metrics import Metrics
from exhook.pacing import AdaptiveLimit, LoopLag


async def test_jobs_of_one_client_run_in_order_others_concurrently() -> None:
    queues = ClientQueues(Metrics(), slots=AdaptiveLimit(maximum=8))
    log: list[str] = []
    release, b1_done = asyncio.Event(), asyncio.Event()

    def job(name: str, wait: bool = False):  # type: ignore[no-untyped-def]
        async def run() -> None:
            if wait:
                await release.wait()
            log.append(name)
            if name == "b1":
                b1_done.set()
        return run

    queues.submit("a", "1", job("a1", wait=True))
    queues.submit("a", "2", job("a2"))
    queues.submit("b", "1", job("b1"))
    await b1_done.wait()
    assert log == ["b1"]  # b is not held up by a's slow job; a2 waits behind a1
    release.set()
    await queues.idle()
    assert log == ["b1", "a1", "a2"]


async def test_a_failing_job_does_not_stop_the_client_queue() -> None:
    queues = ClientQueues(Metrics())
    done: list[int] = []

    async def boom() -> None:
        raise RuntimeError("x")

    async def ok() -> None:
        done.append(1)

    queues.submit("c", "boom", boom)
    queues.submit("c", "ok", ok)
    await queues.idle()
    assert done == [1]


async def test_bounded_per_client_and_closed_queue_refuses(caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics()
    queues = ClientQueues(metrics, max_per_client=2)
    hold = asyncio.Event()

    async def wait() -> None:
        await hold.wait()

    assert queues.submit("c", "1", wait)
    assert queues.submit("c", "2", wait)
    assert not any(queues.submit("c", f"{i}", wait) for i in range(3, 503))
    assert metrics.sample("client_jobs_dropped_total") == 500
    # one line for the lot (a client subscribing to thousands of filters at once)
    assert len([r for r in caplog.records if "job queue full" in r.getMessage()]) == 1
    hold.set()
    await queues.close(1)
    assert not queues.submit("c", "4", wait)


async def test_close_cancels_work_that_does_not_finish() -> None:
    queues = ClientQueues(Metrics())
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def forever() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    queues.submit("c", "forever", forever)
    await started.wait()
    await queues.close(0.05)
    assert cancelled.is_set()


class HandFed(LoopLag):
    async def run(self, on_sample: Callable[[float], None]) -> None:
        await asyncio.Event().wait()


async def test_jobs_wait_while_the_service_is_busy_and_start_in_order_when_it_is_not() -> None:
    slots = AdaptiveLimit(initial=1, maximum=1, sampler=HandFed())
    queues = ClientQueues(Metrics(), slots=slots)
    log: list[str] = []
    hold, a1_started, a1_done = asyncio.Event(), asyncio.Event(), asyncio.Event()

    def job(name: str, wait: bool = False):  # type: ignore[no-untyped-def]
        async def run() -> None:
            log.append(name)
            if wait:
                a1_started.set()
                await hold.wait()
                a1_done.set()
        return run

    queues.submit("a", "1", job("a1", wait=True))
    await a1_started.wait()
    slots.on_sample(0.05)  # busy: nothing new starts, not even when a1 is done
    queues.submit("b", "1", job("b1"))
    queues.submit("a", "2", job("a2"))
    queues.submit("c", "1", job("c1"))
    hold.set()
    await a1_done.wait()  # a1's task has finished by the time this waiter runs
    assert log == ["a1"]
    slots.on_sample(0.0)  # keeps up again: one slot, clients in the order they waited
    await queues.idle()
    assert log == ["a1", "b1", "c1", "a2"]
    await queues.close(1)


def noting(log: list[str], name: str) -> Callable[[], Awaitable[None]]:
    async def run() -> None:
        log.append(name)
    return run


async def test_a_job_that_waits_outside_its_slot_lets_others_run_keeps_its_clients_order_and_goes_first() -> None:
    # goes first: ahead of jobs that have not started (in a storm, a restore that waited a
    # moment for the broker finishes before the next of thousands of queued restores starts)
    slots = AdaptiveLimit(initial=1, maximum=1, sampler=HandFed())
    queues = ClientQueues(Metrics(), slots=slots)
    log: list[str] = []
    registered, b_started, b_may_end = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def a1() -> None:  # a restore waiting for its client to be registered
        async with outside_slot():
            await registered.wait()
        log.append("a1")

    async def b1() -> None:
        log.append("b1")
        b_started.set()
        await b_may_end.wait()

    queues.submit("a", "1", a1)
    queues.submit("a", "2", noting(log, "a2"))
    queues.submit("b", "1", b1)
    await b_started.wait()  # the only slot went to b while a1 waits
    queues.submit("c", "1", noting(log, "c1"))  # waits for a slot before a1 does
    registered.set()
    for _ in range(5):
        await asyncio.sleep(0)
    assert log == ["b1"] and slots.running == 1  # a1 waits for a slot again; a2 behind it
    b_may_end.set()
    await queues.idle()
    assert log == ["b1", "a1", "c1", "a2"] and slots.running == 0
    await queues.close(1)


async def test_a_job_keeps_its_slot_while_too_many_wait_outside_theirs() -> None:
    slots = AdaptiveLimit(initial=1, maximum=1, sampler=HandFed())
    queues = ClientQueues(Metrics(), slots=slots, max_stepped_out=0)
    log: list[str] = []

    async def a1() -> None:
        await sleep_outside_slot(0.01)
        log.append("a1")

    queues.submit("a", "1", a1)
    queues.submit("b", "1", noting(log, "b1"))
    await queues.idle()
    assert log == ["a1", "b1"]
    await queues.close(1)


async def test_close_cancels_jobs_waiting_outside_their_slot_or_for_one_again() -> None:
    slots = AdaptiveLimit(initial=1, maximum=1, sampler=HandFed())
    queues = ClientQueues(Metrics(), slots=slots)
    a_wait, c_started = asyncio.Event(), asyncio.Event()
    cancelled: list[str] = []

    def waiting(name: str, until: asyncio.Event) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            try:
                async with outside_slot():
                    await until.wait()
            except asyncio.CancelledError:
                cancelled.append(name)
                raise
        return run

    async def c1() -> None:  # holds the only slot
        c_started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append("c")
            raise

    queues.submit("a", "1", waiting("a", a_wait))
    queues.submit("b", "1", waiting("b", asyncio.Event()))
    queues.submit("c", "1", c1)
    await c_started.wait()
    a_wait.set()  # a now waits for a slot again, b still waits outside its own
    for _ in range(5):
        await asyncio.sleep(0)
    assert queues.waiting
    await queues.close(0.05)
    assert sorted(cancelled) == ["a", "b", "c"]
    assert slots.running == 0 and not queues.waiting
