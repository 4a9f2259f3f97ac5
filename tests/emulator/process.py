"""The two concurrency primitives of the emulator.

* :class:`Process` plays an Erlang process (an EMQX channel): a mailbox of jobs run strictly one after the
  other by one task. Everything EMQX does "in the client's process" (hooks, deliveries, acks, REST subscribe
  requests) is a job in that client's mailbox, so a slow hook stalls exactly that client.
* :class:`Link` plays one direction of a TCP connection: items arrive in order, each ``delay`` seconds after
  it was sent.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")
Job = Callable[[], Awaitable[Any]]

log = logging.getLogger("tests.emulator")


class Process:
    """A serial executor: ``post`` / ``call`` jobs, run one at a time in arrival order."""

    def __init__(self, name: str, on_error: Callable[[str, BaseException], None]) -> None:
        self.name = name
        self._on_error = on_error
        self._queue: asyncio.Queue[tuple[Job, asyncio.Future[Any] | None]] = asyncio.Queue()
        self._busy = False
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"emqx-process:{name}")

    def post(self, job: Job) -> None:
        """Send a message: the job runs later in this process; nobody waits for it."""
        self._queue.put_nowait((job, None))

    def call(self, job: Callable[[], Awaitable[T]]) -> asyncio.Future[T]:
        """A synchronous call (``gen_server:call``): the returned future resolves with the job's result."""
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((job, fut))
        return fut

    @property
    def idle(self) -> bool:
        return not self._busy and self._queue.empty()

    async def _run(self) -> None:
        while True:
            job, fut = await self._queue.get()
            self._busy = True
            try:
                result = await job()
            except asyncio.CancelledError:
                if fut is not None and not fut.done():
                    fut.cancel()
                raise
            except Exception as exc:
                self._on_error(self.name, exc)
                if fut is not None and not fut.done():
                    fut.set_exception(exc)
            else:
                if fut is not None and not fut.done():
                    fut.set_result(result)
            finally:
                self._busy = False

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        while not self._queue.empty():
            _, fut = self._queue.get_nowait()
            if fut is not None and not fut.done():
                fut.cancel()


class Link:
    """An ordered one-way pipe with a fixed latency; each item is a callable run on arrival."""

    def __init__(self, delay: float, on_error: Callable[[BaseException], None] | None = None) -> None:
        self.delay = max(0.0, delay)
        self._on_error = on_error
        self._items: collections.deque[tuple[float, Callable[[], None]]] = collections.deque()
        self._pump: asyncio.Task[None] | None = None
        self._closed = False

    def send(self, item: Callable[[], None]) -> None:
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        self._items.append((loop.time() + self.delay, item))
        if self._pump is None or self._pump.done():
            self._pump = loop.create_task(self._run())

    @property
    def idle(self) -> bool:
        return not self._items

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self._items:
            due, item = self._items[0]
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            else:
                # let other tasks run between arrivals, as a socket would
                await asyncio.sleep(0)
            if not self._items or self._items[0][1] is not item:
                continue
            self._items.popleft()
            try:
                item()
            except Exception as exc:  # an arrival handler must never kill the link
                log.exception("link item failed")
                if self._on_error is not None:
                    self._on_error(exc)

    def close(self) -> None:
        self._closed = True
        self._items.clear()
        if self._pump is not None:
            self._pump.cancel()
