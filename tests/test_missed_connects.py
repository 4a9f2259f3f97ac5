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
from exhook.missed_connects import LOOKBACK_S, QUIET_S, SETTLE_MAX_S, ConnectCalls, MissedConnectSweep
from exhook.replay import BrokerFlags
from tests.ports import free_port
from tests.test_emqx_api import client as api_client


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


CREATED, CONNECTED = "OnSessionCreated", "OnClientConnected"


def test_a_call_whose_handler_ran_is_not_lost() -> None:
    clock = Clock()
    calls = ConnectCalls(lost_after_s=5, clock=clock)
    calls.arrived(CREATED).handled = True
    clock.now += 60
    assert calls.take_lost() == []


def test_a_call_whose_handler_never_ran_is_lost_once_it_is_old_enough() -> None:
    clock = Clock()
    calls = ConnectCalls(lost_after_s=5, clock=clock)
    calls.arrived(CREATED)  # lost
    clock.now += 1
    calls.arrived(CONNECTED).handled = True
    clock.now += 1
    calls.arrived(CONNECTED)  # lost
    clock.now += 4
    waiting = calls.arrived(CREATED)  # still waiting for its handler
    assert calls.take_lost() == [(CREATED, 6.0)]  # the second unhandled one is 5 s old: not yet
    clock.now += 1.5
    assert calls.take_lost() == [(CONNECTED, 5.5)]
    waiting.handled = True
    clock.now += 60
    assert calls.take_lost() == []


@dataclass
class FakeClients:
    """``GET /api/v5/clients`` over a list of clients, paged as EMQX pages it."""

    clients: list[dict[str, Any]] = field(default_factory=list)
    queries: list[dict[str, str]] = field(default_factory=list)
    status: int = 200
    junk: list[Any] = field(default_factory=list)  # entries that are no client, served first
    body: Any = None  # answer this instead of a page

    async def handle(self, request: web.Request) -> web.Response:
        self.queries.append(dict(request.query))
        if self.status != 200:
            return web.json_response({"code": "INTERNAL_ERROR"}, status=self.status)
        if self.body is not None:
            return web.json_response(self.body)
        page, limit = int(request.query["page"]), int(request.query["limit"])
        since = int(request.query["gte_created_at"])
        listed = [c for c in self.clients if c["created_ms"] >= since]
        data = [{k: v for k, v in c.items() if k != "created_ms"} for c in listed[(page - 1) * limit:page * limit]]
        return web.json_response({"data": self.junk + data, "meta": {"page": page, "limit": limit, "count": len(listed),
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
        self.busy = False
        flags = BrokerFlags()
        flags.peerports_seen = peerports
        # the wall clock moves with the monotonic one
        self.sweep = MissedConnectSweep(self.calls, api, self.restore, flags, self.metrics, busy=lambda: self.busy,
                                        wall=lambda: self.clock.now + 9_900.0, clock=self.clock)

    def restore(self, client: ClientRef) -> bool:
        self.restored.append(client)
        return True

    def lose_calls(self, age_s: float, *rpcs: str) -> None:
        for rpc in rpcs or (CREATED, CONNECTED):
            self.calls.arrived(rpc)
        self.clock.now += age_s
        self.sweep.note_losses()


async def test_the_sweep_restores_the_fresh_sessions_without_subscriptions_page_by_page(
        fake_api: tuple[FakeClients, EmqxApi], monkeypatch: pytest.MonkeyPatch) -> None:
    fake, api = fake_api
    monkeypatch.setattr(missed_connects, "PAGE_LIMIT", 2)
    window_start_ms = int((10_000.0 - LOOKBACK_S) * 1000)  # the calls reached the service at wall 10,000
    fake.clients = [listed("old", 0, 1, window_start_ms - 1), listed("a", 0, 11, window_start_ms),
                    listed("has-subs", 2, 12, window_start_ms + 5), listed("b", 0, 13, window_start_ms + 9),
                    listed("c", 0, 14, window_start_ms + 9)]
    rig = Sweep(api)
    rig.lose_calls(11.0)
    assert rig.sweep.pending_since() == window_start_ms
    await rig.sweep.sweep_once()
    assert [(c.clientid, c.peerport, c.node, c.peerhost) for c in rig.restored] == [
        ("a", 11, "emqx@10.0.0.1", "10.0.0.9"), ("b", 13, "emqx@10.0.0.1", "10.0.0.9"),
        ("c", 14, "emqx@10.0.0.1", "10.0.0.9")]
    assert [q["page"] for q in fake.queries] == ["1", "2"]
    assert {q["conn_state"] for q in fake.queries} == {"connected"}
    assert {q["gte_created_at"] for q in fake.queries} == {str(window_start_ms)}
    assert rig.metrics.sample("connect_calls_lost_total", hook="session.created") == 1
    assert rig.metrics.sample("connect_calls_lost_total", hook="client.connected") == 1
    assert rig.metrics.sample("missed_connect_restores_total") == 3
    assert rig.sweep.pending_since() is None  # settled: no second sweep without a new loss
    await rig.sweep.sweep_once()
    assert len(fake.queries) == 2


async def test_without_peer_ports_no_sweep_runs(fake_api: tuple[FakeClients, EmqxApi]) -> None:
    # EMQX 5.3: a connection's key repeats at every connect, so a restore from the sweep
    # could not keep its replay marks apart from the last connection's
    fake, api = fake_api
    fake.clients = [listed("a", 0, 11, 10_000_000)]
    rig = Sweep(api, peerports=False)
    rig.lose_calls(11.0)
    await rig.sweep.sweep_once()
    assert fake.queries == [] and rig.restored == []
    assert rig.sweep.pending_since() is None


async def test_a_sweep_emqx_refuses_keeps_its_window_for_the_next_try(fake_api: tuple[FakeClients, EmqxApi]) -> None:
    fake, api = fake_api
    fake.clients = [listed("a", 0, 11, 10_000_000)]
    fake.status = 503
    rig = Sweep(api)
    rig.lose_calls(11.0)
    owed = rig.sweep.pending_since()
    for _ in range(5):  # minutes of failures, with the clock moving on
        with pytest.raises(EmqxApiError):
            await rig.sweep.sweep_once()
        rig.clock.now += 30
        rig.sweep.note_losses()
    assert rig.sweep.pending_since() == owed
    fake.status = 200
    await rig.sweep.sweep_once()
    assert [c.clientid for c in rig.restored] == ["a"]


async def test_a_long_storm_keeps_the_start_of_the_window(fake_api: tuple[FakeClients, EmqxApi]) -> None:
    _, api = fake_api
    rig = Sweep(api)
    first = int((10_000.0 - LOOKBACK_S) * 1000)
    for _ in range(8):  # both hooks keep losing calls for 80 s
        rig.lose_calls(11.0)
        rig.clock.now -= 1.0  # lose_calls advanced 11 s; the next calls arrive 10 s after these
        assert rig.sweep.pending_since() == first


async def test_losses_of_one_connect_hook_alone_need_no_sweep(fake_api: tuple[FakeClients, EmqxApi]) -> None:
    # both hooks of a client come over one connection, so to one worker: a client whose
    # session.created was lost got its client.connected here (and was restored by it)
    fake, api = fake_api
    fake.clients = [listed("a", 0, 11, 10_000_000)]
    rig = Sweep(api)
    rig.lose_calls(11.0, CREATED, CREATED)
    assert rig.sweep.pending_since() is None and not rig.sweep.due()
    await rig.sweep.sweep_once()
    assert fake.queries == [] and rig.restored == []
    rig.lose_calls(11.0, CONNECTED)  # now both kinds were lost: some client may have lost both
    assert rig.sweep.pending_since() == int((10_000.0 - LOOKBACK_S) * 1000)  # from the older loss on
    await rig.sweep.sweep_once()
    assert [c.clientid for c in rig.restored] == ["a"]


async def test_a_loss_of_one_hook_long_ago_does_not_pair_with_a_later_one(
        fake_api: tuple[FakeClients, EmqxApi]) -> None:
    _, api = fake_api
    rig = Sweep(api)
    rig.lose_calls(11.0, CREATED)
    rig.clock.now += LOOKBACK_S + 1
    rig.sweep.note_losses()
    rig.lose_calls(11.0, CONNECTED)
    assert rig.sweep.pending_since() is None


async def test_a_sweep_waits_until_the_storm_is_over_here(fake_api: tuple[FakeClients, EmqxApi]) -> None:
    # during the storm the hooks' own restores are held back by the pacing: a sweep then
    # would find every client still without subscriptions and restore it a second time
    _, api = fake_api
    rig = Sweep(api)
    rig.lose_calls(11.0)
    rig.busy = True  # restores waiting for a slot
    assert not rig.sweep.due()
    rig.busy = False
    call = rig.calls.arrived(CREATED)  # connect calls still arriving
    assert not rig.sweep.due()
    rig.clock.now += QUIET_S
    assert not rig.sweep.due()  # that call still waits for its handler
    call.handled = True
    assert rig.sweep.due()
    rig.busy = True
    rig.clock.now += SETTLE_MAX_S  # a fleet that never stops connecting: not forever
    assert rig.sweep.due()


async def test_entries_that_are_no_client_are_skipped_and_a_junk_answer_keeps_the_window(
        fake_api: tuple[FakeClients, EmqxApi]) -> None:
    fake, api = fake_api
    fake.clients = [listed("a", 0, 11, 10_000_000)]
    fake.body = ["not", "a", "page"]  # a 200 that is not EMQX's answer (a proxy, a bug)
    rig = Sweep(api)
    rig.lose_calls(11.0)
    with pytest.raises(EmqxApiError):
        await rig.sweep.sweep_once()
    assert rig.sweep.pending_since() is not None and rig.restored == []
    fake.body = None
    fake.junk = ["x", None, {}, {"clientid": 5}, {"clientid": "b", "port": "x", "subscriptions_cnt": None}]
    await rig.sweep.sweep_once()
    # the malformed entries are skipped; one with a name but odd fields is kept with defaults
    assert [(c.clientid, c.peerport) for c in rig.restored] == [("b", 0), ("a", 11)]
