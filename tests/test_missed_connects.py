"""Lost connect calls and the sweep that restores their clients (issue 14): which calls
count as lost, and what the sweep asks EMQX's REST API (a real aiohttp server playing
``GET /api/v5/clients``) and restores. The whole path through grpc and the emulator
is tests/e2e/test_missed_connects.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from exhook import missed_connects
from exhook.emqx_api import EmqxApi, EmqxApiError
from exhook.hooks import ClientRef
from exhook.metrics import Metrics
from exhook.missed_connects import LOOKBACK_S, ConnectCalls, MissedConnectSweep
from exhook.replay import BrokerFlags
from tests.ports import free_port
from tests.test_emqx_api import client as api_client


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_call_whose_handler_ran_is_not_lost() -> None:
    clock = Clock()
    calls = ConnectCalls(lost_after_s=5, clock=clock)
    calls.arrived().handled = True
    clock.now += 60
    assert calls.take_lost() == (0, 0.0)


def test_a_call_whose_handler_never_ran_is_lost_once_it_is_old_enough() -> None:
    clock = Clock()
    calls = ConnectCalls(lost_after_s=5, clock=clock)
    calls.arrived()  # lost
    clock.now += 1
    calls.arrived().handled = True
    clock.now += 1
    calls.arrived()  # lost
    clock.now += 4
    waiting = calls.arrived()  # still waiting for its handler
    assert calls.take_lost() == (1, 6.0)  # the second unhandled one is 5 s old: not yet
    clock.now += 1.5
    assert calls.take_lost() == (1, 5.5)
    waiting.handled = True
    clock.now += 60
    assert calls.take_lost() == (0, 0.0)


@dataclass
class FakeClients:
    """``GET /api/v5/clients`` over a list of clients, paged as EMQX pages it."""

    clients: list[dict[str, Any]] = field(default_factory=list)
    queries: list[dict[str, str]] = field(default_factory=list)
    status: int = 200

    async def handle(self, request: web.Request) -> web.Response:
        self.queries.append(dict(request.query))
        if self.status != 200:
            return web.json_response({"code": "INTERNAL_ERROR"}, status=self.status)
        page, limit = int(request.query["page"]), int(request.query["limit"])
        since = int(request.query["gte_created_at"])
        listed = [c for c in self.clients if c["created_ms"] >= since]
        data = [{k: v for k, v in c.items() if k != "created_ms"} for c in listed[(page - 1) * limit:page * limit]]
        return web.json_response({"data": data, "meta": {"page": page, "limit": limit, "count": len(listed),
                                                         "hasnext": page * limit < len(listed)}})


def listed(clientid: str, subs: int, port: int, created_ms: int) -> dict[str, Any]:
    return {"clientid": clientid, "node": "emqx@10.0.0.1", "ip_address": "10.0.0.9", "port": port,
            "subscriptions_cnt": subs, "created_at": "2026-12-02T00:00:00.000+00:00", "created_ms": created_ms}


@pytest.fixture
async def fake_api() -> AsyncIterator[tuple[FakeClients, EmqxApi]]:
    fake = FakeClients()
    app = web.Application()
    app.router.add_get("/api/v5/clients", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    api = await api_client(f"http://127.0.0.1:{port}")
    yield fake, api
    await api.close()
    await runner.cleanup()


class Sweep:
    def __init__(self, api: EmqxApi, peerports: bool = True) -> None:
        self.clock = Clock()
        self.calls = ConnectCalls(lost_after_s=5, clock=self.clock)
        self.restored: list[ClientRef] = []
        self.metrics = Metrics()
        flags = BrokerFlags()
        flags.peerports_seen = peerports
        self.sweep = MissedConnectSweep(self.calls, api, self.restore, flags, self.metrics, wall=lambda: 10_000.0)

    def restore(self, client: ClientRef, created: float | None) -> bool:
        self.restored.append(client)
        return True

    def lose_a_call(self, age_s: float) -> None:
        self.calls.arrived()
        self.clock.now += age_s
        self.sweep._note_losses()


async def test_the_sweep_restores_the_fresh_sessions_without_subscriptions_page_by_page(
        fake_api: tuple[FakeClients, EmqxApi], monkeypatch: pytest.MonkeyPatch) -> None:
    fake, api = fake_api
    monkeypatch.setattr(missed_connects, "PAGE_LIMIT", 2)
    window_start_ms = int((10_000.0 - 8.0 - LOOKBACK_S) * 1000)
    fake.clients = [listed("old", 0, 1, window_start_ms - 1), listed("a", 0, 11, window_start_ms),
                    listed("has-subs", 2, 12, window_start_ms + 5), listed("b", 0, 13, window_start_ms + 9),
                    listed("c", 0, 14, window_start_ms + 9)]
    rig = Sweep(api)
    rig.lose_a_call(8.0)
    await rig.sweep.sweep_once()
    assert [(c.clientid, c.peerport, c.node, c.peerhost) for c in rig.restored] == [
        ("a", 11, "emqx@10.0.0.1", "10.0.0.9"), ("b", 13, "emqx@10.0.0.1", "10.0.0.9"),
        ("c", 14, "emqx@10.0.0.1", "10.0.0.9")]
    assert [q["page"] for q in fake.queries] == ["1", "2"]
    assert {q["conn_state"] for q in fake.queries} == {"connected"}
    assert {q["gte_created_at"] for q in fake.queries} == {str(window_start_ms)}
    assert rig.metrics.sample("connect_calls_lost_total") == 1
    assert rig.metrics.sample("missed_connect_restores_total") == 3
    await rig.sweep.sweep_once()  # the window is closed: no second sweep without a new loss
    assert len(fake.queries) == 2


async def test_without_peer_ports_the_sweep_restores_connections_keyed_as_emqx_5_3_hooks_are(
        fake_api: tuple[FakeClients, EmqxApi]) -> None:
    fake, api = fake_api
    fake.clients = [listed("a", 0, 11, 10_000_000)]
    rig = Sweep(api, peerports=False)
    rig.lose_a_call(6.0)
    await rig.sweep.sweep_once()
    assert [c.connection for c in rig.restored] == ["a|emqx@10.0.0.1|10.0.0.9|0"]


async def test_a_sweep_emqx_refuses_keeps_its_window_for_the_next_try(fake_api: tuple[FakeClients, EmqxApi]) -> None:
    fake, api = fake_api
    fake.clients = [listed("a", 0, 11, 10_000_000)]
    fake.status = 503
    rig = Sweep(api)
    rig.lose_a_call(6.0)
    with pytest.raises(EmqxApiError):
        await rig.sweep.sweep_once()
    fake.status = 200
    await rig.sweep.sweep_once()
    assert [c.clientid for c in rig.restored] == ["a"]
