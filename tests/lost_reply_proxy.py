"""A loopback TCP proxy that loses the reply of chosen commands, after the server ran them.

A client sends through the proxy; the first ``times`` chunks the client sends that
``trigger`` matches reach the server, whose reply is read and thrown away, and
then the client's connection is cut: to the client, the reply was lost on a
connection that failed, and Redis has run the command. Everything else is passed
through unchanged. The test owns the proxy and closes it (``async with``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from types import TracebackType

REPLY_WAIT_S = 5.0  # how long the proxy waits for the server to answer a command it loses


class LostReplyProxy:
    def __init__(self, upstream: tuple[str, int], trigger: Callable[[bytes], bool], times: int = 1) -> None:
        self.upstream = upstream
        self.trigger = trigger
        self.left = times
        self.lost = 0  # replies lost so far
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> LostReplyProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        server_r, server_w = await asyncio.open_connection(*self.upstream)
        replied = asyncio.Event()
        losing = False

        async def to_client() -> None:
            while data := await server_r.read(65536):
                if losing:  # the reply of the command being lost: thrown away
                    replied.set()
                    continue
                client_w.write(data)
                await client_w.drain()

        async def to_server() -> None:
            nonlocal losing
            while data := await client_r.read(65536):
                lose = self.left > 0 and self.trigger(data)
                if lose:
                    self.left -= 1
                    losing = True
                server_w.write(data)
                await server_w.drain()
                if lose:
                    await asyncio.wait_for(replied.wait(), REPLY_WAIT_S)  # the server ran it
                    self.lost += 1
                    return

        pumps = [asyncio.ensure_future(to_client()), asyncio.ensure_future(to_server())]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            client_w.transport.abort()  # the client sees its connection fail, no reply
            server_w.close()
            with contextlib.suppress(OSError):
                await server_w.wait_closed()
            self._tasks.discard(task)
