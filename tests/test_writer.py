"""The ordered group-commit writer, against a recording store stand-in (the
writer's contract is about ordering, batching and retries, not a backend)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, cast

import pytest

from exhook.metrics import Metrics
from exhook.writer import OrderedWriter, WriterClosed
from storage.base import Store, StoreError
from storage.gated import GatedStore
from storage.model import DeleteMessage, SaveMessage, StoredMessage, WriteOp


class RecordingStore:
    name = "recording"

    def __init__(self) -> None:
        self.batches: list[list[WriteOp]] = []
        self.fail_next = 0
        self.gate: asyncio.Event | None = None

    async def write(self, ops: Sequence[WriteOp]) -> None:
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_next:
            self.fail_next -= 1
            raise StoreError("down")
        self.batches.append(list(ops))


def save(i: int) -> SaveMessage:
    return SaveMessage(StoredMessage(f"{i:032X}", "c", "t", 1, False, b"p", 0))


def make(store: RecordingStore, batch_size: int = 10, max_pending: int = 100) -> OrderedWriter:
    writer = OrderedWriter(cast(Store, store), Metrics(), batch_size, 0, max_pending)
    writer.start()
    return writer


async def test_concurrent_ops_share_round_trips_in_order() -> None:
    store = RecordingStore()
    store.gate = asyncio.Event()
    writer = make(store, batch_size=10)
    futs = [writer.submit_nowait(save(i)) for i in range(25)]
    store.gate.set()
    await asyncio.gather(*cast(list[Any], futs))
    assert [len(b) for b in store.batches] == [10, 10, 5]
    flat = [op for batch in store.batches for op in batch]
    assert flat == [save(i) for i in range(25)]
    await writer.close(1)


async def test_delete_never_overtakes_its_insert() -> None:
    store = RecordingStore()
    writer = make(store, batch_size=3)
    ops: list[WriteOp] = []
    for i in range(10):
        ops.append(save(i))
        ops.append(DeleteMessage(f"{i:032X}", "t"))
    futs = [writer.submit_nowait(op) for op in ops]
    await asyncio.gather(*cast(list[Any], futs))
    flat = [op for batch in store.batches for op in batch]
    assert flat == ops
    await writer.close(1)


async def test_failed_batch_is_retried_until_the_store_returns() -> None:
    store = RecordingStore()
    store.fail_next = 3
    metrics = Metrics()
    gate = GatedStore(cast(Store, store), metrics.store_failure)  # as the service wires it
    gate.is_open = True
    writer = OrderedWriter(gate.store, metrics, 10, 0, 100)
    writer.start()
    fut = writer.submit_nowait(save(1))
    assert fut is not None
    await asyncio.wait_for(fut, 5)
    assert store.batches == [[save(1)]]
    assert metrics.sample("store_failures_total", operation="write") == 3
    await writer.close(1)


async def test_full_buffer_refuses_then_applies_backpressure() -> None:
    store = RecordingStore()
    store.gate = asyncio.Event()
    writer = make(store, batch_size=2, max_pending=4)
    accepted = [writer.submit_nowait(save(i)) for i in range(6)]
    assert [f is not None for f in accepted] == [True] * 4 + [False] * 2
    await asyncio.sleep(0)  # the writer takes one batch (2 ops) and blocks on the gate
    assert writer.submit_nowait(save(4)) is not None
    assert writer.submit_nowait(save(5)) is not None
    waiting = asyncio.create_task(writer.submit(save(99)))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    store.gate.set()
    fut = await asyncio.wait_for(waiting, 5)
    await asyncio.wait_for(fut, 5)
    await writer.close(1)


async def test_close_flushes_queued_ops_then_refuses_new_ones() -> None:
    store = RecordingStore()
    writer = make(store)
    for i in range(5):
        writer.submit_nowait(save(i))
    await writer.close(5)
    assert sum(len(b) for b in store.batches) == 5
    with pytest.raises(WriterClosed):
        writer.submit_nowait(save(6))


async def test_ops_arriving_while_lingering_join_the_batch() -> None:
    store = RecordingStore()
    writer = OrderedWriter(cast(Store, store), Metrics(), 10, 50, 100)
    writer.start()
    await asyncio.sleep(0)  # the writer now waits for work
    futs = [writer.submit_nowait(save(0))]  # wakes the writer first...
    loop = asyncio.get_running_loop()
    # ...then calls the server already received run their handlers on the next loop turns
    for i in range(1, 4):
        loop.call_soon(lambda i=i: futs.append(writer.submit_nowait(save(i))))
    await asyncio.sleep(0.05)
    await asyncio.gather(*cast(list[Any], futs))
    assert [len(b) for b in store.batches] == [4]
    await writer.close(1)


async def test_an_idle_writer_does_not_wait_for_batch_time() -> None:
    store = RecordingStore()
    writer = OrderedWriter(cast(Store, store), Metrics(), 100, 60_000, 100)
    writer.start()
    fut = writer.submit_nowait(save(1))
    assert fut is not None
    await asyncio.wait_for(fut, 5)  # a minute-long batch_time is not waited for
    assert store.batches == [[save(1)]]
    await writer.close(1)


async def test_drained_waits_for_a_lingering_batch() -> None:
    store = RecordingStore()
    writer = OrderedWriter(cast(Store, store), Metrics(), 10, 50, 100)
    writer.start()
    await asyncio.sleep(0)
    writer.submit_nowait(save(1))
    await asyncio.sleep(0)  # the writer took the op and lingers for more
    await writer.drained()
    assert store.batches == [[save(1)]]
    await writer.close(1)
