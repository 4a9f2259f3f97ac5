"""HeldRekeys: a replay's re-key waits for its ack, which takes it back; unacked ones
reach the writer in order (after their hold, at a flush, or beyond the bound)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from exhook.held_rekeys import HeldRekeys
from storage.model import RekeyMessage


def rekey(old: int, new: int, topic: str = "t/a") -> RekeyMessage:
    return RekeyMessage(f"{old:032x}", f"{new:032x}", topic)


class Sent:
    def __init__(self) -> None:
        self.ops: list[RekeyMessage] = []
        self.changed = asyncio.Event()

    def __call__(self, op: RekeyMessage) -> None:
        self.ops.append(op)
        self.changed.set()

    async def until(self, count: int) -> None:
        async with asyncio.timeout(5):
            while len(self.ops) < count:
                self.changed.clear()
                await self.changed.wait()


@pytest.fixture
async def sent() -> Sent:
    return Sent()


@pytest.fixture
async def running(sent: Sent) -> AsyncIterator[HeldRekeys]:
    held = HeldRekeys(sent, hold_s=0.05)
    task = asyncio.create_task(held.run())
    yield held
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def hexid(i: int) -> str:
    return f"{i:032x}"


async def test_an_ack_takes_its_rekey_back_and_nothing_is_sent(running: HeldRekeys, sent: Sent) -> None:
    running.hold(rekey(1, 101))
    assert running.acked(hexid(101)) == hexid(1)  # the id to delete: the stored one
    running.hold(rekey(2, 102))  # a later one still goes: the loop ran past the first one's time
    await sent.until(1)
    assert sent.ops == [rekey(2, 102)]
    assert len(running) == 0


async def test_unacked_rekeys_reach_the_writer_in_order_after_their_hold(running: HeldRekeys, sent: Sent) -> None:
    for i in range(5):
        running.hold(rekey(i, 100 + i))
    await sent.until(5)
    assert sent.ops == [rekey(i, 100 + i) for i in range(5)]
    assert running.acked(hexid(100)) is None  # sent already: the ack deletes the new id as before


async def test_an_ack_of_any_replay_of_a_message_takes_back_all_its_rekeys(sent: Sent) -> None:
    held = HeldRekeys(sent, hold_s=60)
    held.hold(rekey(1, 101))  # replayed to a connection that went away
    held.hold(rekey(2, 102))
    held.hold(rekey(1, 111))  # the same stored message replayed again
    assert held.acked(hexid(111)) == hexid(1)
    assert held.acked(hexid(101)) is None
    held.flush()
    assert sent.ops == [rekey(2, 102)]


async def test_an_unacked_group_goes_in_the_order_it_was_held(sent: Sent) -> None:
    held = HeldRekeys(sent, hold_s=60)
    held.hold(rekey(1, 101))
    held.hold(rekey(2, 102))
    held.hold(rekey(1, 111))
    held.hold(rekey(1, 111))  # the same re-key twice keeps its place
    held.flush()
    assert sent.ops == [rekey(1, 101), rekey(2, 102), rekey(1, 111)]
    assert len(held) == 0 and held.acked(hexid(111)) is None


async def test_beyond_the_bound_the_oldest_go_at_once(sent: Sent) -> None:
    held = HeldRekeys(sent, hold_s=60, max_held=3)
    for i in range(5):
        held.hold(rekey(i, 100 + i))
    assert sent.ops == [rekey(0, 100), rekey(1, 101)]
    assert len(held) == 3


async def test_once_part_of_a_group_was_sent_an_ack_deletes_the_copy_where_it_moved(sent: Sent) -> None:
    held = HeldRekeys(sent, hold_s=60, max_held=2)
    held.hold(rekey(1, 101))  # to a connection that went away unacked
    held.hold(rekey(1, 111))  # the same message replayed again before that re-key was written
    held.hold(rekey(2, 102))  # over the bound: 1 -> 101 goes to the writer and moves the copy
    assert sent.ops == [rekey(1, 101)]
    assert held.acked(hexid(111)) == hexid(101)
    held.flush()
    assert sent.ops == [rekey(1, 101), rekey(2, 102)]


async def test_a_hold_of_zero_sends_every_rekey_at_once(sent: Sent) -> None:
    held = HeldRekeys(sent, hold_s=0)
    held.hold(rekey(1, 101))
    assert sent.ops == [rekey(1, 101)] and len(held) == 0
    assert held.acked(hexid(101)) is None


async def test_a_flush_of_some_topics_sends_only_theirs(sent: Sent) -> None:
    held = HeldRekeys(sent, hold_s=60)
    held.hold(rekey(1, 101, "t/a"))
    held.hold(rekey(2, 102, "t/b"))
    held.hold(rekey(3, 103, "t/a"))
    held.flush(["t/a"])
    assert sent.ops == [rekey(1, 101, "t/a"), rekey(3, 103, "t/a")]
    assert held.acked(hexid(102)) == hexid(2)
