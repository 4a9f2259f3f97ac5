"""Supervised loops (issue 10 item 4): a loop that fails unexpectedly is logged once
with its cause, counted, makes the service not ready with a reason, and starts
again; readiness then recovers. Each of the service's loops is broken once for real."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

import exhook.server
from exhook.config import HostPort, load_config_string
from exhook.health import EMQX_API, Conditions, failing_reasons
from exhook.loops import Loops
from exhook.metrics import Metrics
from exhook.server import Service
from exhook.writer import OrderedWriter
from storage.base import StoreError
from storage.factory import create_store
from storage.retry import Backoff


async def test_a_failing_loop_reports_restarts_and_recovers() -> None:
    metrics = Metrics()
    conditions: list[tuple[str, bool, str]] = []
    runs = 0
    finished = asyncio.Event()

    async def loop() -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            raise KeyError("boom")
        finished.set()

    loops = Loops(metrics, lambda *c: conditions.append(c), Backoff(base=0.001, cap=0.001))
    loops.start("demo", loop)
    await asyncio.wait_for(finished.wait(), 5)
    assert conditions == [("loop demo", False, "demo loop failed: KeyError: 'boom'"), ("loop demo", True, "")]
    assert metrics.sample("loop_restarts_total", loop="demo") == 1
    await loops.stop_all()


class Flaky:
    """Wraps a real store; ``fail[name]`` = how many calls of that operation raise a
    plain RuntimeError (a bug, not a store error); ``down_opens`` opens fail first."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.name = inner.name
        self.fail: dict[str, int] = {}
        self.down_opens = 0

    async def open(self) -> None:
        if self.down_opens:
            self.down_opens -= 1
            raise StoreError("not yet")
        await self._maybe_fail("open")
        await self._inner.open()

    async def _maybe_fail(self, name: str) -> None:
        if self.fail.get(name):
            self.fail[name] -= 1
            raise RuntimeError(f"injected failure in {name}")

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._inner, name)
        if name not in ("ping", "purge_expired"):
            return target

        async def call(*args: Any) -> Any:
            await self._maybe_fail(name)
            return await target(*args)

        return call


class Changes(list[tuple[bool, str]]):
    """Readiness changes as the service reports them, with a way to wait for one."""

    def __init__(self) -> None:
        super().__init__()
        self.changed = asyncio.Event()

    def __call__(self, conditions: Conditions) -> None:
        # as /readyz?exclude=emqx_api shows it: no EMQX runs for these tests
        failing = failing_reasons(conditions, exclude={EMQX_API})
        self.append((not failing, "; ".join(failing)))
        self.changed.set()

    async def wait_until(self, what: Callable[[], bool], timeout: float = 10) -> None:
        async with asyncio.timeout(timeout):
            while not what():
                self.changed.clear()
                await self.changed.wait()


async def start(tmp_path: Path, store: Flaky, changes: Changes) -> Service:
    cfg = load_config_string(f'sqlite {{ enable = true, path = "{tmp_path}/db.sqlite3", topics = ["t/#"] }}\n'
                             f'exhook {{ spool.path = "{tmp_path}/spool", http.check_interval = 100ms }}')
    svc = dataclasses.replace(cfg.service, listen=HostPort("127.0.0.1", 0),
                              http=dataclasses.replace(cfg.service.http, enable=False))
    service = Service(dataclasses.replace(cfg, service=svc), store=store,  # type: ignore[arg-type]
                      on_readiness=changes)
    await service.start()
    return service


Arm = Callable[[Flaky, pytest.MonkeyPatch], Awaitable[None] | None]


def arm_readiness(store: Flaky, monkeypatch: pytest.MonkeyPatch) -> None:
    from exhook.health import Readiness

    original = Readiness.check
    calls = 0

    async def crash_once(self: Readiness) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:  # the first check is start-up's own; the loop's first one crashes
            raise RuntimeError("injected failure in readiness")
        await original(self)

    monkeypatch.setattr(Readiness, "check", crash_once)


def arm_purge(store: Flaky, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(exhook.server, "_PURGE_EVERY_S", 0.05)
    store.fail["purge_expired"] = 1


def arm_open(store: Flaky, monkeypatch: pytest.MonkeyPatch) -> None:
    store.down_opens = 1  # start-up cannot open it: the open loop takes over...
    store.fail["open"] = 1  # ...and crashes once


def arm_writer(store: Flaky, monkeypatch: pytest.MonkeyPatch) -> None:
    original = OrderedWriter._write_direct
    calls = 0

    async def crash_once(self: OrderedWriter) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("injected failure in the writer")
        await original(self)

    monkeypatch.setattr(OrderedWriter, "_write_direct", crash_once)


@pytest.mark.parametrize(("loop", "arm"), [
    ("readiness", arm_readiness), ("purge-expired", arm_purge), ("open-store", arm_open), ("writer", arm_writer),
])
async def test_each_service_loop_survives_a_crash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture, loop: str, arm: Arm) -> None:
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(exhook.loops.Loops.__init__, "__defaults__", (Backoff(base=0.05, cap=0.05),))
    cfg = load_config_string(f'sqlite {{ enable = true, path = "{tmp_path}/db.sqlite3" }}')
    store = Flaky(create_store(cfg.backend))
    arm(store, monkeypatch)
    changes = Changes()
    service = await start(tmp_path, store, changes)
    try:
        if loop == "writer":  # the writer's loop runs on the first write
            service._writer.submit(_save())
        failed = f"{loop} loop failed: RuntimeError: injected failure"
        await changes.wait_until(lambda: any(failed in why for _, why in changes) and changes[-1] == (True, ""))
        assert service.metrics.sample("loop_restarts_total", loop=loop) == 1
        lines = [r for r in caplog.records if getattr(r, "event", "") == "loop_failed"]
        assert len(lines) == 1 and lines[0].exc_info is None
    finally:
        await service.stop()


def _save() -> Any:
    from storage.model import SaveMessage, StoredMessage

    return SaveMessage(StoredMessage("0005F1B4C2D1E2F30A0B0C0D0E0F1011", "c", "t/a", 1, False, b"x", 1))
