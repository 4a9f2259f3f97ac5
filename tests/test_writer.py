"""The ordered group-commit writer and its spool, against a recording store stand-in
(the writer's contract is about ordering, batching, isolation of refused ops and
durability through the spool, not a backend). The spool is a real file.

No test waits for time to pass: the store stand-in blocks on events the test
releases, and the tests wait for outcomes, not for sleeps."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import pytest

from exhook.deadlines import Deadlines
from exhook.metrics import Metrics
from exhook.spool import Spool
from exhook.writer import Entry, OrderedWriter, Outcome, WriterClosed, WriterSettings
from storage.base import Store, StoreError, WriteRejected
from storage.model import DeleteMessage, SaveMessage, StoredMessage, WriteOp
from storage.retry import Backoff


class RecordingStore:
    """Records the batches it is given; ``gate`` holds writes until set; ``down``
    fails every write; ``refuse`` names msgids it refuses for good (with their
    index when ``tell_index``); ``crash_on`` makes it raise a plain TypeError."""

    name = "recording"

    def __init__(self) -> None:
        self.batches: list[list[WriteOp]] = []
        self.gate: asyncio.Event | None = None
        self.down = False
        self.refuse: set[str] = set()
        self.tell_index = False
        self.crash_on: set[str] = set()
        self.calls = 0
        self.called = asyncio.Event()

    async def write(self, ops: Sequence[WriteOp]) -> None:
        self.calls += 1
        self.called.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.down:
            raise StoreError("down")
        for i, op in enumerate(ops):
            msgid = op.message.msgid if isinstance(op, SaveMessage) else getattr(op, "msgid", "")
            if msgid in self.refuse:
                raise WriteRejected("too_long", f"{msgid} does not fit", i if self.tell_index else None)
            if msgid in self.crash_on:
                raise TypeError("a driver bug")
        self.batches.append(list(ops))

    async def ping(self) -> None:
        if self.down:
            raise StoreError("down")

    @property
    def written(self) -> list[WriteOp]:
        return [op for batch in self.batches for op in batch]


def msgid(i: int) -> str:
    return f"{i:032X}"


def save(i: int) -> SaveMessage:
    return SaveMessage(StoredMessage(msgid(i), "c", "t", 1, False, b"p" * 10, 0))


def delete(i: int) -> DeleteMessage:
    return DeleteMessage(msgid(i), "t")


async def open_spool(tmp_path: Path) -> Spool:
    spool = Spool(tmp_path / "spool.sqlite3")
    await spool.open()
    return spool


class Running:
    """A writer with its loop running, and the spool under it."""

    def __init__(self, store: RecordingStore, spool: Spool, batch_size: int = 10, max_pending: int = 1000,
                 spool_max_bytes: int = 1 << 20, linger_s: float = 0.0, spill_after_s: float = 3600) -> None:
        self.store = store
        self.spool = spool
        self.metrics = Metrics()
        self.health: list[tuple[bool, str]] = []
        # a linger is ended by what arrives, never by a clock: gap and window far beyond any test
        settings = WriterSettings(batch_size, max_pending, spool_max_bytes, backoff=Backoff(base=0.001, cap=0.002),
                                  linger_s=linger_s, gap_s=linger_s, active_window_s=3600,
                                  spill_after_s=spill_after_s)
        self.writer = OrderedWriter(cast(Store, store), spool, self.metrics, settings,
                                    on_health=lambda ok, why: self.health.append((ok, why)))
        self.task = asyncio.create_task(self.writer.run())

    async def close(self) -> int:
        lost = await self.writer.close(5)
        await asyncio.gather(self.task, return_exceptions=True)  # it ends, or close cancels a hung write
        return lost


@pytest.fixture
async def spool(tmp_path: Path) -> Any:
    spool = await open_spool(tmp_path)
    yield spool
    await spool.close()


async def outcomes(entries: Sequence[Entry]) -> list[Outcome]:
    await asyncio.gather(*(cast(asyncio.Future[Outcome], e.done) for e in entries))
    return [cast(Outcome, e.outcome) for e in entries]


async def test_ops_queued_during_a_write_share_the_next_round_trip_in_order(spool: Spool) -> None:
    store = RecordingStore()
    store.gate = asyncio.Event()
    w = Running(store, spool, batch_size=10)
    entries = [w.writer.submit(save(0))]
    await store.called.wait()  # the first op went out alone: nothing waited for company
    entries += [w.writer.submit(save(i)) for i in range(1, 25)]
    store.gate.set()
    assert await outcomes(entries) == [Outcome.STORED] * 25
    assert [len(b) for b in store.batches] == [1, 10, 10, 4]
    assert store.written == [save(i) for i in range(25)]
    assert await w.close() == 0


async def test_caught_up_waits_until_the_ops_queued_so_far_have_their_outcome(spool: Spool) -> None:
    store = RecordingStore()
    store.gate = asyncio.Event()
    w = Running(store, spool, batch_size=2)
    entries = [w.writer.submit(save(i)) for i in range(3)]  # 0 in flight; 1, 2 queued
    await store.called.wait()
    caught_up = asyncio.create_task(w.writer.caught_up(60))
    await asyncio.sleep(0)
    later = w.writer.submit(save(3))
    await asyncio.sleep(0.01)
    assert not caught_up.done()  # the store holds them all
    store.gate.set()
    await caught_up
    assert all(e.outcome is Outcome.STORED for e in entries)
    await outcomes([later])
    await w.writer.caught_up(60)  # nothing queued: at once
    assert await w.close() == 0


async def test_caught_up_waits_even_when_the_caller_of_the_last_op_stopped_waiting(spool: Spool) -> None:
    store = RecordingStore()
    store.gate = asyncio.Event()
    w = Running(store, spool)
    entry = w.writer.submit(save(0))
    await store.called.wait()
    cast(asyncio.Future[Outcome], entry.done).cancel()  # its publisher answered at the deadline
    caught_up = asyncio.create_task(w.writer.caught_up(60))
    await asyncio.sleep(0.01)
    assert not caught_up.done()
    store.gate.set()
    await caught_up
    assert entry.outcome is Outcome.STORED
    assert await w.close() == 0


async def test_caught_up_gives_up_after_its_timeout(spool: Spool) -> None:
    store = RecordingStore()
    store.gate = asyncio.Event()  # the store hangs
    w = Running(store, spool)
    entry = w.writer.submit(save(0))
    await w.writer.caught_up(0.05)
    assert not entry.settled
    store.gate.set()
    assert await w.close() == 0


def publish(w: Running, i: int, source: str) -> Entry:
    """A message save whose caller (the broker's message.publish) waits for it."""
    return w.writer.submit(save(i), source=source, spill_in=3600)


async def test_a_lone_publisher_never_waits_for_company(spool: Spool) -> None:
    store = RecordingStore()
    w = Running(store, spool, linger_s=3600)
    for i in range(3):  # one client, one op in flight: each goes out alone, at once
        assert await outcomes([publish(w, i, "a")]) == [Outcome.STORED]
    assert [len(b) for b in store.batches] == [1, 1, 1]
    await w.close()


async def test_a_batch_waits_for_the_other_active_clients_and_no_longer(spool: Spool) -> None:
    store = RecordingStore()
    w = Running(store, spool, linger_s=3600)
    await outcomes([publish(w, 0, "a"), publish(w, 1, "b")])
    first = publish(w, 2, "a")  # b is active and has no op in this batch: wait for it
    await asyncio.sleep(0)  # one turn of the loop: the writer (woken first) takes the op and waits
    assert [e.op for e in w.writer._in_flight] == [save(2)] and len(store.batches) == 1
    second = publish(w, 3, "b")  # every active client is in the batch now: it goes
    assert await outcomes([first, second]) == [Outcome.STORED] * 2
    assert store.batches[-1] == [save(2), save(3)]
    await w.close()


async def test_a_batch_waiting_for_an_active_client_that_sends_nothing_goes_after_its_linger(
        spool: Spool) -> None:
    store = RecordingStore()
    w = Running(store, spool, linger_s=0.02)  # the gap and batch_time end the wait, not an arrival
    await outcomes([publish(w, 0, "a"), publish(w, 1, "b")])
    alone = publish(w, 2, "a")  # b stays active (window 3600 s) but sends nothing
    assert await asyncio.wait_for(outcomes([alone]), 10) == [Outcome.STORED]
    assert store.batches[-1] == [save(2)]
    await w.close()


async def test_acks_of_a_lone_subscriber_share_a_round_trip_until_a_publish_joins(spool: Spool) -> None:
    """Nobody waits for a delete: the batch takes the next ones of the same client
    (a subscriber acking a replay one message at a time), and goes once an op
    whose caller waits has joined and no other client may send one."""
    store = RecordingStore()
    w = Running(store, spool, linger_s=3600)
    acks = [w.writer.submit(delete(0), source="sub")]
    await asyncio.sleep(0)  # the writer takes it, and waits for more
    assert len(store.batches) == 0
    acks += [w.writer.submit(delete(i), source="sub") for i in range(1, 5)]
    await asyncio.sleep(0.01)
    assert len(store.batches) == 0  # still nobody waiting: it goes on gathering
    published = publish(w, 9, "pub")  # a caller waits now, and every active client is in the batch
    assert await asyncio.wait_for(outcomes([*acks, published]), 10) == [Outcome.STORED] * 6
    assert store.batches == [[delete(0), delete(1), delete(2), delete(3), delete(4), save(9)]]
    await w.close()


async def test_acks_nobody_joins_go_after_the_linger(spool: Spool) -> None:
    store = RecordingStore()
    w = Running(store, spool, linger_s=0.02)
    ack = w.writer.submit(delete(0), source="sub")
    assert await asyncio.wait_for(outcomes([ack]), 10) == [Outcome.STORED]
    assert store.batches == [[delete(0)]]
    await w.close()


async def test_a_delete_never_overtakes_its_insert(spool: Spool) -> None:
    store = RecordingStore()
    w = Running(store, spool, batch_size=3)
    ops: list[WriteOp] = []
    for i in range(10):
        ops += [save(i), delete(i)]
    entries = [w.writer.submit(op) for op in ops]
    await outcomes(entries)
    assert store.written == ops
    await w.close()


async def test_a_refused_op_is_set_aside_and_the_rest_of_its_batch_is_written(spool: Spool) -> None:
    for tell_index in (False, True):
        store = RecordingStore()
        store.refuse = {msgid(3), msgid(6)}
        store.tell_index = tell_index
        store.gate = asyncio.Event()
        w = Running(store, spool, batch_size=10)
        entries = [w.writer.submit(save(i)) for i in range(10)]
        store.gate.set()
        got = await outcomes(entries)
        assert got == [Outcome.REJECTED if i in (3, 6) else Outcome.STORED for i in range(10)]
        assert store.written == [save(i) for i in range(10) if i not in (3, 6)]
        assert w.metrics.sample("writes_rejected_total", backend="recording", reason="too_long") == 2
        kept = await spool.set_aside_rows(10)
        assert [r.op for r in kept[:2]] == [save(6), save(3)] and kept[0].reason == "too_long"
        await w.close()


async def test_an_op_that_breaks_the_store_without_a_reason_is_found_and_set_aside(spool: Spool) -> None:
    store = RecordingStore()
    store.crash_on = {msgid(2)}  # a driver's TypeError on this op's data, not a refusal
    w = Running(store, spool)
    entries = [w.writer.submit(save(i)) for i in range(5)]
    await store.called.wait()
    await w.writer.spill(entries[-1])  # retried like a passing failure until the callers' deadline
    assert await outcomes(entries) == [Outcome.SPOOLED] * 5
    await w.writer.drained()  # the drainer goes one by one, sees the op after it go through
    assert store.written == [save(0), save(1), save(3), save(4)]
    assert w.metrics.sample("writes_rejected_total", backend="recording", reason="refused") == 1
    assert [r.op for r in await spool.set_aside_rows(10)] == [save(2)]
    await w.close()


async def test_a_store_that_fails_everything_has_nothing_set_aside(spool: Spool) -> None:
    for broken in ("down", "crash"):  # a store error, and a bug that breaks every write
        store = RecordingStore()
        store.down = broken == "down"
        store.crash_on = {msgid(i) for i in range(4)} if broken == "crash" else set()
        w = Running(store, spool)
        entries = [w.writer.submit(save(i)) for i in range(4)]
        await store.called.wait()
        await w.writer.spill(entries[-1])
        while store.calls < 30:  # the drainer keeps trying, one op at a time after a while
            store.called.clear()
            await store.called.wait()
        assert spool.count == 4 and await spool.set_aside_rows(10) == []
        store.down, store.crash_on = False, set()
        await w.writer.drained()
        assert store.written == [save(i) for i in range(4)]
        await w.close()


async def test_a_failing_store_is_tried_again_until_a_caller_needs_its_answer(spool: Spool) -> None:
    store = RecordingStore()
    store.down = True
    w = Running(store, spool)
    entry = w.writer.submit(save(0))
    while store.calls < 3:  # tried again and again, nothing settled: the caller still waits
        store.called.clear()
        await store.called.wait()
    assert entry.outcome is None and spool.count == 0
    store.down = False
    assert await outcomes([entry]) == [Outcome.STORED]
    assert spool.count == 0 and w.health[0][0] is False and w.health[-1] == (True, "")
    await w.close()


async def test_ops_nobody_waits_for_go_to_the_spool_once_the_store_failed_long_enough(spool: Spool) -> None:
    store = RecordingStore()
    store.down = True
    w = Running(store, spool, spill_after_s=0)  # "long enough" = at once here
    ack = w.writer.submit(delete(1), source="subscriber")
    assert await outcomes([ack]) == [Outcome.SPOOLED]  # no caller asked: the writer did
    store.down = False
    await w.writer.drained()
    assert store.written == [delete(1)]
    await w.close()


async def test_a_failing_store_sends_writes_to_the_spool_and_gets_them_back_in_order(spool: Spool) -> None:
    store = RecordingStore()
    store.down = True
    w = Running(store, spool, batch_size=4)
    ops: list[WriteOp] = [save(0), save(1), delete(0), save(2), save(3), delete(3), save(4)]
    entries = [w.writer.submit(op) for op in ops]
    await store.called.wait()
    await w.writer.spill(entries[-1])  # the last caller's deadline is near: everything before it goes too
    assert await outcomes(entries) == [Outcome.SPOOLED] * len(ops)
    assert spool.count == len(ops) and w.writer.spooling
    assert "store writes failing" in w.writer.problem() or "spool draining" in w.writer.problem()
    assert w.health[0][0] is False
    later = w.writer.submit(save(5))  # spooled behind the others, not written around them
    assert await outcomes([later]) == [Outcome.SPOOLED]
    store.down = False
    await w.writer.drained()
    assert store.written == [*ops, save(5)]
    assert spool.count == 0 and not w.writer.spooling and w.writer.problem() == ""
    assert w.health[-1] == (True, "")
    assert w.metrics.sample("spool_drained_total") == len(ops) + 1
    after = w.writer.submit(save(6))  # direct again
    assert await outcomes([after]) == [Outcome.STORED]
    await w.close()


async def test_spill_makes_a_waiting_op_durable_while_the_store_hangs(spool: Spool) -> None:
    store = RecordingStore()
    store.gate = asyncio.Event()  # the store does not answer
    w = Running(store, spool, batch_size=2)
    first = [w.writer.submit(save(0)), w.writer.submit(save(1))]
    await store.called.wait()
    queued = w.writer.submit(save(2))
    await w.writer.spill(queued)  # the caller's deadline is near
    assert [e.outcome for e in [*first, queued]] == [Outcome.SPOOLED] * 3
    assert [s.op for s in await spool.head(10)] == [save(0), save(1), save(2)]  # in flight first
    # the hung write is given up, so an op arriving now goes to the spool at once,
    # without waiting for a deadline of its own (no spill for it)
    later = w.writer.submit(delete(0))
    async with asyncio.timeout(5):
        assert await outcomes([later]) == [Outcome.SPOOLED]
    store.gate.set()
    await w.writer.drained()
    assert store.written == [save(0), save(1), save(2), delete(0)]
    await w.close()


async def test_acks_go_to_the_spool_when_a_write_hangs(spool: Spool) -> None:
    """No caller waits for an ack, so no deadline spills it: a write that does not
    return within spill_after_s is given up and its ops spooled (a kill -9 then loses
    none), long before the backend's own timeout would end it."""
    store = RecordingStore()
    store.gate = asyncio.Event()  # the store does not answer
    w = Running(store, spool, batch_size=2, spill_after_s=0.2)
    acks = [w.writer.submit(delete(i)) for i in range(5)]
    async with asyncio.timeout(10):  # the stall limit (30 s) would end it only much later
        assert await outcomes(acks) == [Outcome.SPOOLED] * 5
    assert [s.op for s in await spool.head(10)] == [delete(i) for i in range(5)]
    assert "not answered within" in w.writer.problem()
    store.gate.set()
    await w.writer.drained()
    assert store.written == [delete(i) for i in range(5)]
    await w.close()


async def test_a_full_spool_refuses_messages_but_keeps_acks(spool: Spool) -> None:
    store = RecordingStore()
    store.down = True
    w = Running(store, spool, spool_max_bytes=400)
    saves = [w.writer.submit(save(i)) for i in range(6)]
    acks = [w.writer.submit(delete(i)) for i in range(6)]
    await w.writer.spill(acks[-1])
    got = await outcomes(saves)
    assert Outcome.SPOOLED in got and Outcome.REFUSED in got
    assert got == sorted(got, key=lambda o: o is Outcome.REFUSED)  # the first ones fit, then none
    assert await outcomes(acks) == [Outcome.SPOOLED] * 6
    store.down = False
    await w.writer.drained()
    stored = [op for op in store.written if isinstance(op, SaveMessage)]
    assert len(stored) == got.count(Outcome.SPOOLED)
    await w.close()


async def test_an_op_the_spool_cannot_hold_costs_only_itself(spool: Spool) -> None:
    store = RecordingStore()
    store.down = True
    w = Running(store, spool)
    bad = SaveMessage(StoredMessage(msgid(9), "c", "t", 1, False, b"p", 2**64 - 1))  # past the gate's check
    entries = [w.writer.submit(save(1)), w.writer.submit(bad), w.writer.submit(save(2))]
    await store.called.wait()
    await w.writer.spill(entries[-1])
    assert [e.outcome for e in entries] == [Outcome.SPOOLED, Outcome.REFUSED, Outcome.SPOOLED]
    assert [s.op for s in await spool.head(10)] == [save(1), save(2)]
    await w.close()


async def test_too_many_queued_ops_go_to_the_spool_instead_of_memory(spool: Spool) -> None:
    store = RecordingStore()
    store.gate = asyncio.Event()
    w = Running(store, spool, batch_size=2, max_pending=5)
    entries = [w.writer.submit(save(i)) for i in range(12)]
    await asyncio.gather(*(cast(asyncio.Future[Outcome], e.done) for e in entries[2:]))
    assert all(e.outcome is Outcome.SPOOLED for e in entries[2:])
    store.gate.set()
    await w.writer.drained()
    assert [op for op in store.written if op not in store.written[:2]][-10:] == [save(i) for i in range(2, 12)]
    await w.close()


async def test_close_writes_what_it_can_and_spools_the_rest_then_refuses_new_ops(tmp_path: Path) -> None:
    store = RecordingStore()
    spool = await open_spool(tmp_path)
    w = Running(store, spool)
    entries = [w.writer.submit(save(i)) for i in range(5)]
    assert await w.close() == 0
    assert [e.outcome for e in entries] == [Outcome.STORED] * 5
    with pytest.raises(WriterClosed):
        w.writer.submit(save(6))
    await spool.close()

    hung = RecordingStore()
    hung.gate = asyncio.Event()
    spool = await open_spool(tmp_path)
    w = Running(hung, spool)
    entries = [w.writer.submit(save(i)) for i in range(3)]
    closing = asyncio.create_task(w.writer.close(0))  # no time to wait for the store
    assert await closing == 0
    assert w.task.done()
    assert [e.outcome for e in entries] == [Outcome.SPOOLED] * 3
    assert spool.count == 3
    await spool.close()


async def test_a_new_writer_drains_what_an_earlier_run_left_in_the_spool(tmp_path: Path) -> None:
    spool = await open_spool(tmp_path)
    await spool.append([save(1), save(2), delete(1)])
    await spool.close()
    spool = await open_spool(tmp_path)  # as after a restart
    store = RecordingStore()
    w = Running(store, spool)
    assert w.writer.spooling
    fresh = w.writer.submit(save(3))  # new work waits behind the old
    await w.writer.drained()
    assert store.written == [save(1), save(2), delete(1), save(3)]
    assert fresh.outcome is Outcome.SPOOLED
    await w.close()
    await spool.close()


async def test_pending_gauge_is_live_while_the_store_hangs(spool: Spool) -> None:
    store = RecordingStore()
    store.gate = asyncio.Event()
    w = Running(store, spool, batch_size=1)
    for i in range(4):
        w.writer.submit(save(i))
    assert w.metrics.sample("pending_writes") == 4
    store.gate.set()
    await w.writer.drained()
    assert w.metrics.sample("pending_writes") == 0
    await w.close()


async def test_a_caller_cancelled_during_its_spill_leaves_nothing_behind(spool: Spool) -> None:
    store = RecordingStore()
    store.gate = asyncio.Event()  # hangs
    w = Running(store, spool)
    entries = [w.writer.submit(save(i)) for i in range(5)]
    await store.called.wait()
    spilling = asyncio.create_task(w.writer.spill(entries[-1]))
    await asyncio.sleep(0)  # the spill has started its append...
    spilling.cancel()  # ...when the broker gives up on the caller
    await asyncio.gather(spilling, return_exceptions=True)
    await asyncio.wait_for(asyncio.gather(*(cast(asyncio.Future[Outcome], e.done) for e in entries)), 5)
    assert [e.outcome for e in entries] == [Outcome.SPOOLED] * 5
    assert spool.count == 5 and [s.op for s in await spool.head(10)] == [save(i) for i in range(5)]
    store.gate.set()
    await w.close()


async def test_a_crash_of_the_writer_loop_puts_its_batch_back_first(spool: Spool) -> None:
    store = RecordingStore()
    w = Running(store, spool)
    health_calls = 0

    def broken_health(ok: bool, why: str) -> None:  # a listener that raises, inside the loop
        nonlocal health_calls
        health_calls += 1
        raise RuntimeError("listener bug")

    w.writer._on_health = broken_health
    store.down = True
    entries = [w.writer.submit(save(i)) for i in range(3)]
    [crash] = await asyncio.gather(w.task, return_exceptions=True)
    assert isinstance(crash, RuntimeError)
    assert [e.op for e in w.writer._queue] == [save(0), save(1), save(2)]  # back in the queue, in order
    store.down = False
    w.writer._on_health = lambda ok, why: None
    w.task = asyncio.create_task(w.writer.run())  # as the supervisor restarts it
    assert await outcomes(entries) == [Outcome.STORED] * 3
    assert store.written == [save(i) for i in range(3)] and health_calls == 1
    await w.close()


async def test_the_set_aside_table_keeps_the_newest_within_its_byte_bound(spool: Spool,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import exhook.spool

    monkeypatch.setattr(exhook.spool, "SET_ASIDE_MAX_BYTES", 2500)
    for i in range(5):
        op = SaveMessage(StoredMessage(msgid(i), "c", "t", 1, False, b"x" * 1000, 0))
        await spool.set_aside("recording", "too_large", "big", op)
    kept = await spool.set_aside_rows(10)
    assert [r.op.message.msgid for r in kept if isinstance(r.op, SaveMessage)] == [msgid(4), msgid(3)]
    huge = SaveMessage(StoredMessage(msgid(9), "c", "t", 1, False, b"x" * 5000, 0))
    await spool.set_aside("recording", "too_large", "huge", huge)  # the newest row always stays
    assert [r.op for r in await spool.set_aside_rows(10)] == [huge]


# -- the callers' deadlines (exhook.deadlines): one timer spills what is late ----------
async def test_a_waiting_op_goes_to_the_spool_at_its_deadline_by_itself(spool: Spool) -> None:
    store = RecordingStore()
    store.gate = asyncio.Event()  # the store does not answer
    w = Running(store, spool, batch_size=2)
    late = [w.writer.submit(save(0), spill_in=0.02), w.writer.submit(save(1), spill_in=0.03)]
    acked = w.writer.submit(delete(7))  # nobody waits for it, but it is queued before a later caller
    later = w.writer.submit(save(2), spill_in=0.04)
    assert await asyncio.wait_for(outcomes([*late, later]), 10) == [Outcome.SPOOLED] * 3
    assert acked.outcome is Outcome.SPOOLED
    store.gate.set()
    await w.close()


async def test_an_earlier_deadline_submitted_later_is_kept_too(spool: Spool) -> None:
    store = RecordingStore()
    store.gate = asyncio.Event()
    w = Running(store, spool, batch_size=1)
    patient = w.writer.submit(save(0), spill_in=3600)
    hurried = w.writer.submit(save(1), spill_in=0.02)  # e.g. a publish that waited before its submit
    assert await asyncio.wait_for(outcomes([hurried]), 10) == [Outcome.SPOOLED]
    assert patient.outcome is Outcome.SPOOLED  # everything before it goes too
    store.gate.set()
    await w.close()


class SpillSpy:
    """A stand-in for the writer's spill: records the entries it is called for and
    settles them as ``settles`` says (None: leaves them unsettled)."""

    def __init__(self, settles: Outcome | None = Outcome.SPOOLED, fails: bool = False) -> None:
        self.calls: list[Entry] = []
        self.settles = settles
        self.fails = fails

    async def __call__(self, entry: Entry) -> None:
        self.calls.append(entry)
        if self.fails:
            raise RuntimeError("a bug")
        if self.settles is not None:
            entry.settle(self.settles)


def waiting_entry(i: int) -> Entry:
    return Entry(save(i), asyncio.get_running_loop().create_future())


async def test_deadlines_skip_settled_ops_and_gone_callers_and_rearm_after_a_spill() -> None:
    spy = SpillSpy()
    deadlines = Deadlines(spy)
    now = asyncio.get_running_loop().time()
    stored, gone, first, second = (waiting_entry(i) for i in range(4))
    stored.settle(Outcome.STORED)  # stored in time
    assert gone.done is not None
    gone.done.cancel()  # the broker gave up on this publish
    for entry, at in ((stored, now), (gone, now), (first, now + 0.01), (second, now + 0.02)):
        deadlines.add(entry, at)
    assert await asyncio.wait_for(outcomes([first, second]), 10) == [Outcome.SPOOLED] * 2
    assert spy.calls == [first, second]  # one spill per due caller, none for the others
    await deadlines.close()


async def test_a_caller_due_after_a_spill_began_gets_a_spill_of_its_own() -> None:
    """An op submitted while a spill runs is not in that spill; if its deadline passes
    meanwhile, its caller must wait for its own spill, never be answered unspooled."""
    loop = asyncio.get_running_loop()
    first, during = waiting_entry(0), waiting_entry(1)

    class SpillSubmittingMeanwhile(SpillSpy):
        async def __call__(self, entry: Entry) -> None:
            if entry is first:
                deadlines.add(during, loop.time())  # due at once, while this spill runs
            await super().__call__(entry)

    spy = SpillSubmittingMeanwhile()
    deadlines = Deadlines(spy)
    deadlines.add(first, loop.time())
    assert await asyncio.wait_for(outcomes([first, during]), 10) == [Outcome.SPOOLED] * 2
    assert spy.calls == [first, during]
    await deadlines.close()


async def test_a_spill_that_settles_nothing_answers_the_caller_once() -> None:
    for spy in (SpillSpy(settles=None), SpillSpy(fails=True)):
        deadlines = Deadlines(spy)
        late, patient = waiting_entry(0), waiting_entry(1)
        loop = asyncio.get_running_loop()
        deadlines.add(patient, loop.time() + 3600)
        deadlines.add(late, loop.time())
        assert late.done is not None
        await asyncio.wait_for(late.done, 10)  # answered ...
        assert late.outcome is None  # ... as not stored: the op keeps its place in the writer
        assert patient.awaited and spy.calls == [late]  # no spin, no answer before its time
        await deadlines.close()


async def test_a_spool_append_that_breaks_unexpectedly_drops_no_queued_op(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    store = RecordingStore()
    store.gate = asyncio.Event()  # the store hangs: ops wait in the queue
    w = Running(store, spool, batch_size=1)
    w.writer.submit(save(0))
    await store.called.wait()
    queued = [w.writer.submit(save(1)), w.writer.submit(delete(1))]
    real_append = spool.append

    async def broken_append(ops: Any) -> None:
        raise RuntimeError("a bug, not a SpoolError")

    monkeypatch.setattr(spool, "append", broken_append)
    with pytest.raises(RuntimeError):
        await w.writer.spill(queued[-1])
    assert [e.outcome for e in queued] == [None, None]  # not answered, not lost: still queued
    monkeypatch.setattr(spool, "append", real_append)
    await w.writer.spill(queued[-1])
    assert await asyncio.wait_for(outcomes(queued), 10) == [Outcome.SPOOLED] * 2
    assert [s.op for s in await spool.head(10)] == [save(0), save(1), delete(1)]
    store.gate.set()
    await w.close()


async def test_a_batch_spilled_while_waiting_to_retry_is_not_written_again_directly(spool: Spool) -> None:
    # the spill spools the failed batch; written once more around the spool, it could land
    # after a delete the drainer applies and bring a message back
    store = RecordingStore()
    store.down = True
    w = Running(store, spool)
    entry = w.writer.submit(save(0))
    await store.called.wait()
    await w.writer.spill(entry)
    assert await outcomes([entry]) == [Outcome.SPOOLED]
    ack = w.writer.submit(delete(0), source="subscriber")
    assert await outcomes([ack]) == [Outcome.SPOOLED]
    store.down = False
    await w.writer.drained()
    await asyncio.sleep(0)  # the loop takes its next turn
    assert store.written == [save(0), delete(0)]
    await w.close()
    assert store.written == [save(0), delete(0)]


async def test_a_batch_of_hundreds_of_refused_ops_sets_each_aside_without_exhausting_the_stack(
        spool: Spool) -> None:
    # one write per refusal, each naming its op: a recursion per refusal ran out of stack near 490
    store = RecordingStore()
    store.tell_index = True
    ops = [save(i) for i in range(1200)]
    store.refuse = {msgid(i) for i in range(1200) if i % 6}  # 1,000 refused, 200 stored
    w = Running(store, spool, batch_size=1200, max_pending=5000)
    entries = [w.writer.submit(op) for op in ops]
    assert await outcomes(entries) == [Outcome.REJECTED if i % 6 else Outcome.STORED for i in range(1200)]
    assert store.written == [save(i) for i in range(0, 1200, 6)]
    assert w.metrics.sample("writes_rejected_total", backend="recording", reason="too_long") == 1000
    await w.close()
