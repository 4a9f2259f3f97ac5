"""The spool's drainer (exhook/drainer.py) when the spool's head cannot be written:
runs of ops that each break the store without a reason, a store that is down while
the drainer looks past one, and a spool row that cannot be read. The spool is a real
file filled before the writer starts (as after a restart); the store is the
recording stand-in of tests/test_writer.py. No test waits for time to pass: each
waits for the drain (bounded, so that a drain that never ends fails) or for calls."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from exhook import drainer
from exhook.spool import Spool, SpooledOp, op_size
from exhook.writer import OrderedWriter, Outcome
from storage.base import StoreError, WriteRejected
from storage.model import SaveMessage, StoredMessage, WriteOp
from tests.service_proc import eventually
from tests.test_writer import RecordingStore, Running, delete, msgid, open_spool, outcomes, save

DRAIN_BOUND_S = 30  # far beyond any drain here; a drain that never ends fails instead of hanging


async def spool_with(tmp_path: Path, ops: Sequence[WriteOp]) -> Spool:
    """A spool an earlier run left ``ops`` in, opened again."""
    spool = await open_spool(tmp_path)
    await spool.append(ops)
    await spool.close()
    return await open_spool(tmp_path)


async def set_aside_oldest_first(spool: Spool) -> list[WriteOp]:
    return [row.op for row in reversed(await spool.set_aside_rows(100))]


@pytest.mark.parametrize("run", [
    [save(1), delete(1)],  # a poison message and its own ack
    [save(1), save(1), delete(1), delete(1)],  # ... published twice, acked twice
])
async def test_a_run_of_ops_that_each_break_the_store_is_set_aside_and_the_rest_drains(
        tmp_path: Path, run: list[WriteOp]) -> None:
    spool = await spool_with(tmp_path, [save(0), *run, save(2)])
    store = RecordingStore()
    store.crash_on = {msgid(1)}  # a driver's TypeError on this message's save and ack alike
    w = Running(store, spool)
    await asyncio.wait_for(w.writer.drained(), DRAIN_BOUND_S)
    assert store.written == [save(0), save(2)]
    assert await set_aside_oldest_first(spool) == run
    assert w.metrics.sample("writes_rejected_total", backend="recording", reason="refused") == len(run)
    assert spool.count == 0 and not w.writer.spooling and w.writer.problem() == ""
    assert await outcomes([w.writer.submit(save(3))]) == [Outcome.STORED]  # direct again
    await w.close()
    await spool.close()


class DownForProbes(RecordingStore):
    """Breaks on msgid 1 (TypeError) and, while ``probes_fail``, is down (a store
    error) for every other op written alone: the store is down whenever the drainer
    looks past the suspect."""

    probes_fail = True

    async def write(self, ops: Sequence[WriteOp]) -> None:
        alone = ops[0] if len(ops) == 1 else None
        if self.probes_fail and isinstance(alone, SaveMessage) and alone.message.msgid != msgid(1):
            self.calls += 1
            self.called.set()
            raise StoreError("down")
        await super().write(ops)


async def test_a_store_that_is_down_while_the_drainer_looks_past_a_suspect_sets_nothing_aside(
        tmp_path: Path) -> None:
    spool = await spool_with(tmp_path, [save(1), save(2), save(3)])
    store = DownForProbes()
    store.crash_on = {msgid(1)}
    w = Running(store, spool)
    while store.calls < 30:  # many searches past the suspect, each ended by the store being down
        store.called.clear()
        await store.called.wait()
    assert await spool.set_aside_rows(10) == [] and spool.count == 3
    store.probes_fail = False  # the store is back: now the op after the suspect goes through
    await asyncio.wait_for(w.writer.drained(), DRAIN_BOUND_S)
    assert store.written == [save(2), save(3)]
    assert await set_aside_oldest_first(spool) == [save(1)]
    await w.close()
    await spool.close()


class BrokenUntilProbed(RecordingStore):
    """Breaks every write (TypeError) until msgid 2 is written alone: a store that
    fails on everything and recovers while the drainer searches past a suspect."""

    broken = True

    async def write(self, ops: Sequence[WriteOp]) -> None:
        if self.broken and len(ops) == 1 and ops[0] == save(2):
            self.broken = False
        if self.broken:
            self.calls += 1
            self.called.set()
            raise TypeError("a driver bug")
        await super().write(ops)


async def test_ops_before_the_one_that_went_through_are_tried_again_before_being_set_aside(
        tmp_path: Path) -> None:
    spool = await spool_with(tmp_path, [save(0), save(1), save(2), save(3)])
    store = BrokenUntilProbed()
    w = Running(store, spool)
    await asyncio.wait_for(w.writer.drained(), DRAIN_BOUND_S)
    assert await spool.set_aside_rows(10) == []  # they failed only while the store broke on everything
    assert store.written == [save(2), save(0), save(1), save(3)]  # written late, not lost
    await w.close()
    await spool.close()


async def damaged_spool(tmp_path: Path) -> Spool:
    """A spool whose row for msgid 2 holds its payload as TEXT (as a flipped bit in
    the record header would make it): a row no encode wrote."""
    spool = await spool_with(tmp_path, [save(1), save(2), save(3)])
    await spool.close()
    db = sqlite3.connect(tmp_path / "spool.sqlite3")
    db.execute("UPDATE ops SET payload = 'text' WHERE msgid = ?", (msgid(2),))
    db.commit()
    db.close()
    return await open_spool(tmp_path)


async def test_a_spool_row_that_cannot_be_read_is_moved_aside_and_the_rest_drains(tmp_path: Path) -> None:
    spool = await damaged_spool(tmp_path)
    store = RecordingStore()
    w = Running(store, spool)
    await asyncio.wait_for(w.writer.drained(), DRAIN_BOUND_S)
    assert store.written == [save(1), save(3)]
    [row] = await spool.set_aside_rows(10)
    assert (row.backend, row.reason) == ("spool", "damaged") and "payload" in row.detail
    assert isinstance(row.op, SaveMessage) and row.op.message.msgid == msgid(2)
    assert row.op.message.payload == b"text"  # cast to a blob, so that set-aside can show it
    assert spool.count == 0 and spool.bytes == 0
    assert w.metrics.sample("writes_rejected_total", backend="spool", reason="damaged") == 1
    await w.close()
    await spool.close()


async def test_a_spool_row_whose_text_is_not_utf8_is_moved_aside_and_the_rest_drains(tmp_path: Path) -> None:
    # sqlite3 failed the whole read on such a row, before any row could be judged
    spool = await spool_with(tmp_path, [save(1), save(2), save(3)])
    await spool.close()
    db = sqlite3.connect(tmp_path / "spool.sqlite3")
    db.execute("UPDATE ops SET topic = CAST(x'ff80' AS TEXT) WHERE msgid = ?", (msgid(2),))
    db.commit()
    db.close()
    spool = await open_spool(tmp_path)
    store = RecordingStore()
    w = Running(store, spool)
    await asyncio.wait_for(w.writer.drained(), DRAIN_BOUND_S)
    assert store.written == [save(1), save(3)]
    [row] = await spool.set_aside_rows(10)  # listed, the damaged text shown as U+FFFD
    assert "not UTF-8" in row.detail and isinstance(row.op, SaveMessage)
    assert row.op.message.topic == "\ufffd\ufffd"
    await w.close()
    await spool.close()


@pytest.mark.parametrize("damage", [
    "kind = 'q'",  # a damaged kind read as the last kind there is, a save became a drop
    "qos = 7",
    "msgid = ''",
])
async def test_a_spool_row_with_a_damaged_field_is_moved_aside_not_read_as_another_op(
        tmp_path: Path, damage: str) -> None:
    spool = await spool_with(tmp_path, [save(1), save(2), save(3)])
    await spool.close()
    db = sqlite3.connect(tmp_path / "spool.sqlite3")
    db.execute(f"UPDATE ops SET {damage} WHERE seq = 2")
    db.commit()
    db.close()
    spool = await open_spool(tmp_path)
    assert [item.op for item in await spool.head(10)] == [save(1), save(3)]
    [row] = await spool.set_aside_rows(10)
    assert (row.backend, row.reason) == ("spool", "damaged") and "no op of kind" in row.detail
    assert isinstance(row.op, SaveMessage) and row.op.message.payload == save(2).message.payload  # listed whole
    assert spool.damaged == 1
    await spool.close()


async def test_a_reader_that_must_not_change_the_spool_skips_a_damaged_row(tmp_path: Path) -> None:
    spool = await damaged_spool(tmp_path)
    assert [item.op for item in await spool.head(10, move_damaged=False)] == [save(1), save(3)]
    assert spool.count == 3 and await spool.set_aside_rows(10) == []  # left where it is
    await spool.close()


def sized_save(i: int, size: int = 100_000) -> SaveMessage:
    return SaveMessage(StoredMessage(msgid(i), "c", "t", 1, False, b"p" * size, 0))


async def test_head_stops_at_the_row_that_reaches_max_bytes(tmp_path: Path) -> None:
    ops = [sized_save(i) for i in range(3)]
    spool = await spool_with(tmp_path, ops)
    one = op_size(ops[0])
    assert [s.op for s in await spool.head(10, max_bytes=1)] == ops[:1]  # always at least one row
    assert [s.op for s in await spool.head(10, max_bytes=one)] == ops[:1]
    assert [s.op for s in await spool.head(10, max_bytes=one + 1)] == ops[:2]
    assert [s.op for s in await spool.head(10, max_bytes=10 * one)] == ops
    assert [s.op for s in await spool.head(10)] == ops
    await spool.close()


async def test_a_drain_step_reads_a_bounded_number_of_bytes_and_not_under_the_spool_lock(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A spool of large ops left by an earlier run, batch_size far above their number:
    a drain step reads about DRAIN_STEP_BYTES (it read the whole batch: 900 MB once),
    and reads without the spool lock, so that an op spooled meanwhile (a publish at
    its deadline) need not wait for the read (it waited seconds). The op spooled while
    the drainer holds rows it read is drained after them, in order."""
    ops = [sized_save(i) for i in range(10)]
    limit = int(2.5 * op_size(ops[0]))
    monkeypatch.setattr(drainer, "DRAIN_STEP_BYTES", limit, raising=False)
    spool = await spool_with(tmp_path, ops)
    reads: list[tuple[bool, list[int]]] = []  # (the spool lock held while reading?, sizes read)
    first_read, go_on = asyncio.Event(), asyncio.Event()
    real_head = spool.head

    async def head(limit: int, **kwargs: Any) -> list[SpooledOp]:
        held = w.writer._spool_lock.locked()
        rows = await real_head(limit, **kwargs)
        reads.append((held, [op_size(row.op) for row in rows]))
        if not first_read.is_set():  # a read that takes long: the rows are not back yet
            first_read.set()
            await go_on.wait()
        return rows

    spool.head = head  # type: ignore[method-assign]
    store = RecordingStore()
    w = Running(store, spool, batch_size=1000, spool_max_bytes=1 << 30)
    await asyncio.wait_for(first_read.wait(), DRAIN_BOUND_S)
    assert not w.writer._spool_lock.locked()  # a spill may go on while the read does
    late = w.writer.submit(save(100))  # spool mode: it goes to the spool, under the spool lock
    assert await asyncio.wait_for(outcomes([late]), DRAIN_BOUND_S) == [Outcome.SPOOLED]
    go_on.set()
    await asyncio.wait_for(w.writer.drained(), DRAIN_BOUND_S)
    assert store.written == [*ops, save(100)]
    assert not any(held for held, _ in reads)
    assert [len(sizes) for _, sizes in reads if sizes] == [3, 3, 3, 2]  # the last with the late op
    assert all(sum(sizes[:-1]) < limit for _, sizes in reads)  # ends with the row that reaches the limit
    await w.close()
    await spool.close()


async def test_rows_removed_from_the_spool_by_hand_do_not_keep_the_drain_running(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # An operator deletes a poison row with the sqlite3 shell while the service runs:
    # the spool's count says one op more than the file holds. The drain must still end
    # (the writer direct again) instead of reading an empty spool forever.
    spool = await spool_with(tmp_path, [save(0), save(1), save(2)])
    with sqlite3.connect(spool.path) as shell:
        shell.execute("DELETE FROM ops WHERE seq = (SELECT max(seq) FROM ops)")
    assert spool.count == 3
    store = RecordingStore()
    w = Running(store, spool)
    await asyncio.wait_for(w.writer.drained(), DRAIN_BOUND_S)
    assert store.written == [save(0), save(1)]
    assert spool.count == 0 and spool.bytes == 0 and not w.writer.spooling
    assert [r.event for r in caplog.records if hasattr(r, "event")].count("spool_recounted") == 1
    assert await outcomes([w.writer.submit(save(3))]) == [Outcome.STORED]  # direct again
    await w.close()
    await spool.close()


class BrokenButChecksFirst(RecordingStore):
    """Fails every write with a driver TypeError (no reason given) while ``broken``, but
    checks each op before the round trip, as the SQL and Redis backends do: one that
    can never fit is refused (WriteRejected) without the store writing anything."""

    broken = True

    async def write(self, ops: Sequence[WriteOp]) -> None:
        for i, op in enumerate(ops):
            if isinstance(op, SaveMessage) and op.message.msgid in self.refuse:
                self.calls += 1
                self.called.set()
                raise WriteRejected("too_long", "does not fit", i)
        if self.broken:
            self.calls += 1
            self.called.set()
            raise TypeError("a driver bug: every write fails")
        await super().write(ops)


async def test_a_probe_the_store_refuses_is_no_sign_that_it_works(tmp_path: Path) -> None:
    # The search past a suspect head took a refused probe for "the store took it", and
    # then set aside every op before it that still broke the store: valid messages,
    # gone, while the store had taken nothing. Refused probes are set aside alone.
    ops: list[WriteOp] = [save(i) for i in range(15)]
    spool = await spool_with(tmp_path, [*ops, save(99)])
    store = BrokenButChecksFirst()
    store.refuse = {msgid(99)}
    w = Running(store, spool, batch_size=10)
    async def one_set_aside() -> bool:
        return len(await spool.set_aside_rows(100)) == 1

    await eventually(one_set_aside, DRAIN_BOUND_S, "the refused op set aside")
    assert spool.count == 15 and store.written == []
    store.broken = False
    await asyncio.wait_for(w.writer.drained(), DRAIN_BOUND_S)
    assert store.written == ops
    assert await set_aside_oldest_first(spool) == [save(99)]
    await w.close()
    await spool.close()


async def test_the_drainer_does_not_spin_while_the_writer_loop_is_down(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The spool drained while the writer still holds an ack, and the writer's loop is
    # down (it failed; its supervisor restarts it after a pause): the drainer waits
    # between its looks at the empty spool instead of reading it in a hot loop.
    spool = await spool_with(tmp_path, [save(0)])  # spool mode from the start
    store = RecordingStore()
    store.gate = asyncio.Event()
    real = OrderedWriter._spool_pending_now
    crashed = asyncio.Event()

    async def crash_once(self: OrderedWriter, start: bool) -> None:
        if not crashed.is_set() and not start:  # the writer loop moving its queue
            crashed.set()
            raise RuntimeError("any unexpected failure of the writer loop")
        await real(self, start)

    monkeypatch.setattr(OrderedWriter, "_spool_pending_now", crash_once)
    w = Running(store, spool)
    await store.called.wait()  # the drainer is writing save(0)
    w.writer.submit(delete(1))  # an ack: nobody waits for it, no deadline spills it
    await crashed.wait()
    looks = 0
    head = spool.head

    async def counted(*args: Any, **kwargs: Any) -> list[SpooledOp]:
        nonlocal looks
        looks += 1
        return await head(*args, **kwargs)

    monkeypatch.setattr(spool, "head", counted)
    store.gate.set()
    await asyncio.sleep(10 * drainer.EMPTY_PAUSE_S)
    assert 1 <= looks <= 20  # about one per pause; a hot loop made thousands
    monkeypatch.setattr(OrderedWriter, "_spool_pending_now", real)
    w.task = asyncio.create_task(w.writer.run())  # its restart
    await asyncio.wait_for(w.writer.drained(), DRAIN_BOUND_S)
    assert store.written == [save(0), delete(1)]
    await w.close()
    await spool.close()
