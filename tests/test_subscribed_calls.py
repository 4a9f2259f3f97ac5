"""SubscribedCalls (exhook/subscribed_calls.py): what a restore waits for and what it
covered, per connection key, bounded."""

from __future__ import annotations

import asyncio
import tracemalloc

from exhook.client_queue import ClientQueues
from exhook.metrics import Metrics
from exhook.pacing import AdaptiveLimit
from exhook.subscribed_calls import SubscribedCalls


async def test_a_wait_ends_when_every_call_has_arrived_or_at_its_timeout() -> None:
    calls = SubscribedCalls(ttl_s=30, max_connections=10)
    asyncio.get_running_loop().call_later(0.01, calls.arrived, "c1", "a")
    await asyncio.wait_for(calls.wait("c1", ["a"], timeout_s=5), 2)
    assert calls.missing("c1", ["a", "b"]) == ["b"]
    assert await calls.wait("c1", ["a", "b"], timeout_s=0.01) == ["b"]  # b never comes: returns anyway
    assert calls.missing("c1", ["a", "b"]) == ["b"]


async def test_a_covered_filter_is_taken_once_and_a_new_connect_forgets_everything() -> None:
    calls = SubscribedCalls(ttl_s=30, max_connections=10)
    calls.arrived("c1", "a")
    calls.cover("c1", "a")
    assert calls.take_covered("c1", "a") and not calls.take_covered("c1", "a")
    calls.cover("c1", "a")
    calls.forget("c1")
    assert not calls.take_covered("c1", "a")
    assert calls.missing("c1", ["a"]) == ["a"]


async def test_the_calls_noted_are_bounded_per_connection_and_in_connections() -> None:
    calls = SubscribedCalls(ttl_s=30, max_connections=2)
    for i in range(1005):
        calls.arrived("c1", f"t/{i}")
    assert calls.missing("c1", ["t/999", "t/1000"]) == ["t/1000"]  # beyond 1,000 filters: not noted
    calls.arrived("c2", "a")
    calls.arrived("c3", "a")  # the oldest connection goes
    assert calls.missing("c1", ["t/0"]) == ["t/0"]
    assert calls.missing("c3", ["a"]) == []


async def test_forgetting_a_connection_wakes_a_restore_waiting_for_its_calls() -> None:
    calls = SubscribedCalls(ttl_s=30, max_connections=10)
    asyncio.get_running_loop().call_later(0.01, calls.forget, "c1")
    await asyncio.wait_for(calls.wait("c1", ["a"], timeout_s=30), 5)
    assert calls.missing("c1", ["a"]) == ["a"]


def test_a_connections_calls_cost_a_few_bytes_per_filter_however_long_it_is() -> None:
    calls = SubscribedCalls(ttl_s=60, max_connections=10)
    long_filter = "x" * 60_000 + "/{:04d}"
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(1000):
            calls.arrived("conn", long_filter.format(i))
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < 1_000_000  # kept as text, 1,000 filters of 60 KB are 60 MB
    assert calls.missing("conn", [long_filter.format(7), "other"]) == ["other"]


async def test_at_most_max_turns_restores_hold_a_turn_and_the_next_gets_one_freed() -> None:
    calls = SubscribedCalls(ttl_s=30, max_connections=10, max_turns=2)
    inside: list[str] = []
    leave = {name: asyncio.Event() for name in "abc"}

    async def restore(name: str) -> None:
        async with calls.turn():
            inside.append(name)
            await leave[name].wait()
            inside.remove(name)

    tasks = [asyncio.create_task(restore(name)) for name in "abc"]
    await asyncio.sleep(0.01)
    assert inside == ["a", "b"]
    leave["a"].set()
    await asyncio.sleep(0.01)
    assert inside == ["b", "c"]
    leave["b"].set()
    leave["c"].set()
    await asyncio.gather(*tasks)
    assert inside == []


async def test_a_turn_is_given_back_when_its_job_is_cancelled_waiting_for_its_slot_again() -> None:
    # the restore took its turn outside its slot; while it waits for a slot again the
    # queues shut down (the job is cancelled): the turn must not stay taken
    queues = ClientQueues(Metrics(), slots=AdaptiveLimit(initial=1, maximum=1))
    calls = SubscribedCalls(ttl_s=30, max_connections=10, max_turns=1)
    never = asyncio.Event()

    async def restore() -> None:
        async with calls.turn():
            pass

    async def busy() -> None:
        await never.wait()

    queues.submit("a", "restore", restore)  # steps out, takes the turn, waits for a slot
    queues.submit("b", "busy", busy)  # takes the slot the restore gave up
    await asyncio.sleep(0.05)
    await queues.close(0.1)
    async with asyncio.timeout(5):
        async with calls.turn():  # free again
            pass
