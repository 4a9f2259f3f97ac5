"""A ``session.resumed`` flood (issue 10 item 6): 20,000 of them, none followed by
``client.connected``, as a broken or hostile broker could send (the first ones over
real gRPC, v3 and v2, the rest straight into the hook logic, where the state lives).
The per-client state they leave stays within its bound, each call touches O(1)
entries of it (counted, not timed), and the newest resumed client is still
recognised when it connects."""

from __future__ import annotations

import asyncio
import dataclasses
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import grpc
import pytest

import exhook.hooks
import exhook.server
from exhook.config import HostPort, load_config_string
from exhook.expiring import ExpiringMap
from exhook.server import Service
from tests.hook_calls import PB, clientinfo, stub

FLOOD = 20_000
OVER_GRPC = 2_000
BOUND = 1_000  # the service's bound, lowered so that the flood goes well past it


class CountingDict(OrderedDict[str, tuple[float, bool]]):
    """Counts every entry handed out by iterating it: the work the state costs."""

    touched = 0

    def items(self) -> Any:
        for item in super().items():
            CountingDict.touched += 1
            yield item

    def __iter__(self) -> Iterator[str]:
        for key in super().__iter__():
            CountingDict.touched += 1
            yield key


class Recorded(ExpiringMap[str, bool]):
    made: ClassVar[list[Recorded]] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._items = CountingDict()
        Recorded.made.append(self)


class Logic(exhook.hooks.HookLogic):
    made: ClassVar[list[Logic]] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        Logic.made.append(self)


async def test_a_session_resumed_flood_keeps_the_state_bounded_at_o1_per_call(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(exhook.hooks, "_CONNECT_ENTRIES", BOUND)
    monkeypatch.setattr(exhook.hooks, "ExpiringMap", Recorded)
    monkeypatch.setattr(exhook.server, "HookLogic", Logic)
    Recorded.made.clear()
    Logic.made.clear()
    CountingDict.touched = 0
    cfg = load_config_string(f'sqlite {{ enable = true, path = "{tmp_path}/db.sqlite3", topics = ["t/#"] }}\n'
                             f'exhook {{ spool.path = "{tmp_path}/spool" }}')
    svc = dataclasses.replace(cfg.service, listen=HostPort("127.0.0.1", 0),
                              http=dataclasses.replace(cfg.service.http, enable=False))
    service = Service(dataclasses.replace(cfg, service=svc))
    await service.start()
    try:
        (logic,) = Logic.made
        resumed = logic._resumed
        assert isinstance(resumed, Recorded)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
            for version in ("v3", "v2"):
                hooks = stub(channel, version)
                for start in range(0, OVER_GRPC // 2, 500):
                    await asyncio.gather(*(
                        hooks.OnSessionResumed(PB[version].SessionResumedRequest(
                            clientinfo=clientinfo(version, f"{version}-flood-{i}")), timeout=30)
                        for i in range(start, start + 500)))
            for i in range(OVER_GRPC, FLOOD):
                logic.session_resumed(exhook.hooks.ClientRef(f"flood-{i}", "emqx@127.0.0.1", "127.0.0.1", i))
            assert len(resumed) == BOUND
            # O(1) each: a call looks at the oldest entries only (a rebuild per call would touch them all,
            # and one into a new container is caught by the type check)
            assert type(resumed._items) is CountingDict
            # (two maps take an entry per call: the resumed sessions and the connect counts)
            assert CountingDict.touched <= 5 * FLOOD
            # the newest resumed session is still known: its client.connected restores nothing
            newest = f"flood-{FLOOD - 1}"
            await stub(channel, "v3").OnClientConnected(
                PB["v3"].ClientConnectedRequest(clientinfo=clientinfo("v3", newest)), timeout=10)
        assert len(resumed) == BOUND - 1
        assert service.metrics.sample("hook_calls_total", hook="session.resumed") == OVER_GRPC
    finally:
        await service.stop()
