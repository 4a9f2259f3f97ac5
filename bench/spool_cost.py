"""What the spool costs, and how fast a store outage is recovered from (issue 10).

- Append: the service's own ``Spool`` (exhook/spool.py, SQLite WAL, synchronous=FULL):
  one message per append, one after the other (what a publish pays when it is spooled
  alone at its deadline), and batches of 100 (what a busy service pays per message).
- Recovery: ``count`` messages put into a spool, then the service's own writer drains
  them into each real store (as after an outage or a restart): messages per second,
  and so the time a backlog takes to land.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import GuidGen, payload_bytes
from exhook.config import load_config_string
from exhook.metrics import Metrics
from exhook.spool import Spool
from exhook.writer import OrderedWriter, WriterSettings
from storage.factory import create_store
from storage.model import SaveMessage, StoredMessage


@dataclass(slots=True)
class SpoolCost:
    one_p50_ms: float
    one_p99_ms: float
    batch_us_per_msg: float
    n: int


@dataclass(slots=True)
class Recovery:
    messages: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds else float("nan")


def _messages(count: int, payload_size: int, topics: list[str]) -> list[SaveMessage]:
    gen = GuidGen(0x5B001)
    payload = payload_bytes(payload_size)
    return [SaveMessage(StoredMessage(gen.gen().decode(), f"bench-{i % 256}", topics[i % len(topics)], 1, False,
                                      payload, int(time.time() * 1000))) for i in range(count)]


def _remove(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):  # a few unlinks at the end of a measurement
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def _p(values: list[float], pct: int) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))]


async def append_cost(workdir: Path, count: int, payload_size: int, topics: list[str]) -> SpoolCost:
    spool = Spool(workdir / "bench-spool-append.sqlite3")
    await spool.open()
    try:
        ops = _messages(count + 100 * 50, payload_size, topics)
        singles = []
        for op in ops[:count]:
            started = time.perf_counter()
            await spool.append([op])
            singles.append((time.perf_counter() - started) * 1000)
        batched = ops[count:]
        started = time.perf_counter()
        for i in range(0, len(batched), 100):
            await spool.append(batched[i:i + 100])
        per_msg = (time.perf_counter() - started) / len(batched) * 1e6
        return SpoolCost(statistics.median(singles), _p(singles, 99), per_msg, count)
    finally:
        await spool.close()
        _remove(spool.path)


async def recovery(workdir: Path, backend_hocon: str, count: int, payload_size: int, topics: list[str],
                   batch_size: int) -> Recovery:
    """Drain ``count`` spooled messages into the store of ``backend_hocon``."""
    cfg = load_config_string(backend_hocon)
    path = workdir / "bench-spool-recovery.sqlite3"
    spool = Spool(path)
    await spool.open()
    ops = _messages(count, payload_size, topics)
    for i in range(0, count, 500):
        await spool.append(ops[i:i + 500])
    await spool.close()
    spool = Spool(path)  # as after a restart
    await spool.open()
    store = create_store(cfg.backend)
    await store.open()
    writer = OrderedWriter(store, spool, Metrics(), WriterSettings(batch_size, 10_000, 1 << 30))
    try:
        started = time.perf_counter()
        task = asyncio.create_task(writer.run())
        await writer.drained()
        seconds = time.perf_counter() - started
        await writer.close(5)
        await asyncio.gather(task, return_exceptions=True)
        return Recovery(count, seconds)
    finally:
        await store.close()
        await spool.close()
        _remove(path)
