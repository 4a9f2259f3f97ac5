"""Connect calls the broker may have given up on, and the sweep that restores their
clients (issue 14): which calls count as late, what counts as a stall, when a sweep is
owed, and what it asks EMQX's REST API (a real aiohttp server playing
``GET /api/v5/clients``) and restores. The whole path through grpc and the emulator is
tests/e2e/test_missed_connects.py; late calls over real grpc are in tests/test_gate.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiohttp import web

from exhook import missed_connects
from exhook.emqx_api import EmqxApi, EmqxApiError
from exhook.hooks import ClientRef
from exhook.metrics import Metrics
from exhook.missed_connects import LOOKBACK_S, QUIET_S, SETTLE_MAX_S, STALL, ConnectRisk, MissedConnectSweep
from exhook.pb.v3 import exhook_pb2 as pb
from exhook.pb.v3 import exhook_pb2_grpc as pb_grpc
from exhook.replay import BrokerFlags
from tests.ports import free_port
from tests.test_emqx_api import client as api_client
from tests.test_gate import start_service


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


CREATED, CONNECTED = "OnSessionCreated", "OnClientConnected"


def test_a_connect_call_with_under_half_the_hook_timeout_left_is_late() -> None:
    clock, metrics = Clock(), Metrics()
    risk = ConnectRisk(hook_timeout_s=5, metrics=metrics, clock=clock)
    risk.started(CREATED, 4.9)
    risk.started(CONNECTED, 2.5)
    risk.started(CONNECTED, None)  # a caller without a deadline is never late
    assert risk.take() == {}
    risk.started(CREATED, 2.4)
    clock.now += 1
    risk.started(CREATED, 0.0)
    risk.started(CONNECTED, 1.0)
    taken = risk.take()
    assert {kind: (s.first, s.last, s.count) for kind, s in taken.items()} == {
        CREATED: (100.0, 101.0, 2), CONNECTED: (101.0, 101.0, 1)}
    assert risk.take() == {}  # forgotten once taken
    assert metrics.sample("connect_calls_late_total", hook="session.created") == 2
    assert metrics.sample("connect_calls_late_total", hook="client.connected") == 1


def test_quiet_counts_from_the_last_connect_call_that_started() -> None:
    clock = Clock()
    risk = ConnectRisk(hook_timeout_s=5, metrics=Metrics(), clock=clock)
    assert risk.quiet_for(QUIET_S)
    risk.started(CREATED, 5.0)
    clock.now += QUIET_S - 0.1
    assert not risk.quiet_for(QUIET_S)
    clock.now += 0.1
    assert risk.quiet_for(QUIET_S)


async def test_the_ticker_counts_a_loop_that_did_not_run_for_a_quarter_of_the_hook_timeout() -> None:
    metrics = Metrics()
    risk = ConnectRisk(hook_timeout_s=0.4, metrics=metrics)  # a stall from 0.1 s on, ticks of 0.05 s
    ticker = asyncio.create_task(risk.watch_stalls())
    try:
        await asyncio.sleep(0.06)
        time.sleep(0.3)  # noqa: ASYNC251 - a stall, but before any connect call: not counted
        await asyncio.sleep(0.06)
        assert metrics.sample("loop_stalls_total") == 0 and risk.take() == {}
        risk.started(CREATED, 0.4)
        await asyncio.sleep(0.06)
        time.sleep(0.3)  # noqa: ASYNC251 (the stall)
        await asyncio.sleep(0.06)
        assert metrics.sample("loop_stalls_total") == 1
        assert list(risk.take()) == [STALL]
    finally:
        ticker.cancel()
        await asyncio.gather(ticker, return_exceptions=True)


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


NODE = "emqx@10.0.0.1"


def listed(clientid: str, subs: int, port: int, created_ms: int, node: str = NODE) -> dict[str, Any]:
    return {"clientid": clientid, "node": node, "ip_address": "10.0.0.9", "port": port,
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
    def __init__(self, api: EmqxApi, peerport_nodes: tuple[str, ...] = (NODE,)) -> None:
        self.clock = Clock()
        self.metrics = Metrics()
        self.risk = ConnectRisk(hook_timeout_s=5, metrics=self.metrics, clock=self.clock)
        self.restored: list[ClientRef] = []
        self.busy = False
        flags = BrokerFlags()
        for node in peerport_nodes:
            flags.saw_peerport(node)
        # the wall clock moves with the monotonic one
        self.sweep = MissedConnectSweep(self.risk, api, self.restore, flags, self.metrics, busy=lambda: self.busy,
                                        wall=lambda: self.clock.now + 9_900.0, clock=self.clock)

    def restore(self, client: ClientRef) -> bool:
        self.restored.append(client)
        return True

    def suspect(self, age_s: float, *kinds: str) -> None:
        """Late calls of ``kinds`` (a stall for STALL; both hooks by default), seen ``age_s`` later."""
        for kind in kinds or (CREATED, CONNECTED):
            if kind == STALL:
                self.risk.stalled(self.clock.now)
            else:
                self.risk.started(kind, 0.1)
        self.clock.now += age_s
        self.sweep.note_suspicions()


async def test_the_sweep_restores_the_fresh_sessions_without_subscriptions_page_by_page(
        fake_api: tuple[FakeClients, EmqxApi], monkeypatch: pytest.MonkeyPatch) -> None:
    fake, api = fake_api
    monkeypatch.setattr(missed_connects, "PAGE_LIMIT", 2)
    window_start_ms = int((10_000.0 - LOOKBACK_S) * 1000)  # the calls reached the service at wall 10,000
    fake.clients = [listed("old", 0, 1, window_start_ms - 1), listed("a", 0, 11, window_start_ms),
                    listed("has-subs", 2, 12, window_start_ms + 5), listed("b", 0, 13, window_start_ms + 9),
                    listed("c", 0, 14, window_start_ms + 9)]
    rig = Sweep(api)
    rig.suspect(11.0)
    assert rig.sweep.pending_since() == window_start_ms
    await rig.sweep.sweep_once()
    assert [(c.clientid, c.peerport, c.node, c.peerhost) for c in rig.restored] == [
        ("a", 11, "emqx@10.0.0.1", "10.0.0.9"), ("b", 13, "emqx@10.0.0.1", "10.0.0.9"),
        ("c", 14, "emqx@10.0.0.1", "10.0.0.9")]
    assert [q["page"] for q in fake.queries] == ["1", "2"]
    assert {q["conn_state"] for q in fake.queries} == {"connected"}
    assert {q["gte_created_at"] for q in fake.queries} == {str(window_start_ms)}
    assert rig.metrics.sample("missed_connect_restores_total") == 3
    assert rig.sweep.pending_since() is None  # settled: no second sweep without a new loss
    await rig.sweep.sweep_once()
    assert len(fake.queries) == 2


async def test_without_peer_ports_no_sweep_runs(fake_api: tuple[FakeClients, EmqxApi]) -> None:
    # EMQX 5.3: a connection's key repeats at every connect, so a restore from the sweep
    # could not keep its replay marks apart from the last connection's
    fake, api = fake_api
    fake.clients = [listed("a", 0, 11, 10_000_000)]
    rig = Sweep(api, peerport_nodes=())
    rig.suspect(11.0)
    await rig.sweep.sweep_once()
    assert fake.queries == [] and rig.restored == []
    assert rig.sweep.pending_since() is None


async def test_in_a_cluster_being_upgraded_the_sweep_skips_the_nodes_that_send_no_peer_port(
        fake_api: tuple[FakeClients, EmqxApi], caplog: pytest.LogCaptureFixture) -> None:
    fake, api = fake_api
    fake.clients = [listed("on-5.4", 0, 11, 10_000_000), listed("on-5.3", 0, 0, 10_000_000, node="emqx@10.0.0.2")]
    rig = Sweep(api)
    rig.suspect(11.0)
    await rig.sweep.sweep_once()
    assert [c.clientid for c in rig.restored] == ["on-5.4"]
    assert rig.metrics.sample("missed_connect_restores_total") == 1
    line = [r for r in caplog.records if getattr(r, "event", None) == "missed_connect_sweep"]
    assert len(line) == 1 and line[0].__dict__["skipped_no_peerport"] == 1
    assert "1 without subscriptions are on nodes that send no peer port" in line[0].getMessage()


def test_the_nodes_that_send_peer_ports_are_bounded() -> None:
    flags = BrokerFlags()
    for n in range(BrokerFlags.MAX_NODES + 50):
        flags.saw_peerport(f"emqx@node{n}")
    flags.saw_peerport("emqx@node0")
    assert len(flags.peerport_nodes) == BrokerFlags.MAX_NODES


async def test_a_sweep_emqx_refuses_keeps_its_window_for_the_next_try(fake_api: tuple[FakeClients, EmqxApi]) -> None:
    fake, api = fake_api
    fake.clients = [listed("a", 0, 11, 10_000_000)]
    fake.status = 503
    rig = Sweep(api)
    rig.suspect(11.0)
    owed = rig.sweep.pending_since()
    for _ in range(5):  # minutes of failures, with the clock moving on
        with pytest.raises(EmqxApiError):
            await rig.sweep.sweep_once()
        rig.clock.now += 30
        rig.sweep.note_suspicions()
    assert rig.sweep.pending_since() == owed
    fake.status = 200
    await rig.sweep.sweep_once()
    assert [c.clientid for c in rig.restored] == ["a"]


async def test_a_long_storm_keeps_the_start_of_the_window(fake_api: tuple[FakeClients, EmqxApi]) -> None:
    _, api = fake_api
    rig = Sweep(api)
    first = int((10_000.0 - LOOKBACK_S) * 1000)
    for _ in range(8):  # both hooks keep coming late for 80 s
        rig.suspect(11.0)
        rig.clock.now -= 1.0  # suspect advanced 11 s; the next late calls come 10 s after these
        assert rig.sweep.pending_since() == first


async def test_late_calls_of_one_connect_hook_alone_need_no_sweep(fake_api: tuple[FakeClients, EmqxApi]) -> None:
    # both hooks of a client come over one connection, so to one worker: a client whose
    # session.created was dropped got its client.connected here (and was restored by it)
    fake, api = fake_api
    fake.clients = [listed("a", 0, 11, 10_000_000)]
    rig = Sweep(api)
    rig.suspect(11.0, CREATED, CREATED)
    assert rig.sweep.pending_since() is None and not rig.sweep.due()
    await rig.sweep.sweep_once()
    assert fake.queries == [] and rig.restored == []
    rig.suspect(11.0, CONNECTED)  # now both came late: some client may have lost both
    assert rig.sweep.pending_since() == int((10_000.0 - LOOKBACK_S) * 1000)  # from the older one on
    await rig.sweep.sweep_once()
    assert [c.clientid for c in rig.restored] == ["a"]


async def test_a_stall_alone_owes_a_sweep(fake_api: tuple[FakeClients, EmqxApi]) -> None:
    # while the loop did not run, calls of both hooks may have expired with none served late
    fake, api = fake_api
    fake.clients = [listed("a", 0, 11, 10_000_000)]
    rig = Sweep(api)
    rig.risk.started(CREATED, 5.0)  # served in time (a stall before any connect call is none)
    rig.suspect(11.0, STALL)
    assert rig.sweep.pending_since() == int((10_000.0 - LOOKBACK_S) * 1000)
    await rig.sweep.sweep_once()
    assert [c.clientid for c in rig.restored] == ["a"]
    assert rig.metrics.sample("loop_stalls_total") == 1


async def test_late_calls_of_one_hook_long_ago_do_not_pair_with_later_ones_of_the_other(
        fake_api: tuple[FakeClients, EmqxApi]) -> None:
    _, api = fake_api
    rig = Sweep(api)
    rig.suspect(11.0, CREATED)
    rig.clock.now += LOOKBACK_S + 1
    rig.sweep.note_suspicions()
    rig.suspect(11.0, CONNECTED)
    assert rig.sweep.pending_since() is None


async def test_the_window_starts_at_the_oldest_suspicion_still_in_the_look_back(
        fake_api: tuple[FakeClients, EmqxApi]) -> None:
    # session.created late on its own for minutes puts no client at risk: when
    # client.connected comes late too, the window starts from the recent ones only
    _, api = fake_api
    rig = Sweep(api)
    for _ in range(12):  # late calls at wall 10,000, 10,010 ... 10,110, each seen 10 s later
        rig.suspect(10.0, CREATED)
    assert rig.sweep.pending_since() is None
    rig.suspect(1.0, CONNECTED)  # at 10,120, seen at 10,121: the look-back reaches 10,091
    assert rig.sweep.pending_since() == int((10_100.0 - LOOKBACK_S) * 1000)


async def test_a_sweep_waits_until_the_storm_is_over_here(fake_api: tuple[FakeClients, EmqxApi]) -> None:
    # during the storm the hooks' own restores are held back by the pacing: a sweep then
    # would find every client still without subscriptions and restore it a second time
    _, api = fake_api
    rig = Sweep(api)
    rig.suspect(11.0)
    rig.busy = True  # restores waiting for a slot
    assert not rig.sweep.due()
    rig.busy = False
    rig.risk.started(CREATED, 5.0)  # connect calls still coming
    assert not rig.sweep.due()
    rig.clock.now += QUIET_S - 0.1
    assert not rig.sweep.due()
    rig.clock.now += 0.1
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
    rig.suspect(11.0)
    with pytest.raises(EmqxApiError):
        await rig.sweep.sweep_once()
    assert rig.sweep.pending_since() is not None and rig.restored == []
    fake.body = None
    fake.junk = ["x", None, {}, {"clientid": 5},
                 {"clientid": "b", "node": NODE, "port": "x", "subscriptions_cnt": None},
                 {"clientid": "no-node", "port": 5}]
    await rig.sweep.sweep_once()
    # the malformed entries are skipped; one with a name but odd fields is kept with defaults,
    # unless no node that sends peer ports is named
    assert [(c.clientid, c.peerport) for c in rig.restored] == [("b", 0), ("a", 11)]


async def test_over_real_grpc_a_connect_call_sent_with_a_short_deadline_counts_late(tmp_path: Path) -> None:
    # EMQX sends every call's timeout (grpc-timeout); the handler sees what is left of it.
    # The service's hook timeout is EMQX's default 5 s: under 2.5 s left is late.
    service = await start_service(tmp_path)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
            stub = pb_grpc.HookProviderStub(channel)
            info = pb.ClientInfo(clientid="c1", peerhost="10.0.0.9", peerport=4711)
            await stub.OnSessionCreated(pb.SessionCreatedRequest(clientinfo=info), timeout=4.5)
            await stub.OnClientConnected(pb.ClientConnectedRequest(clientinfo=info))
            assert service.metrics.sample("connect_calls_late_total", hook="session.created") == 0
            await stub.OnSessionCreated(pb.SessionCreatedRequest(clientinfo=info), timeout=2.0)
            await stub.OnClientConnected(pb.ClientConnectedRequest(clientinfo=info), timeout=1.0)
        assert service.metrics.sample("connect_calls_late_total", hook="session.created") == 1
        assert service.metrics.sample("connect_calls_late_total", hook="client.connected") == 1
    finally:
        await service.stop()


async def test_a_list_that_never_ends_stops_the_sweep_at_an_empty_page_or_the_page_bound(
        fake_api: tuple[FakeClients, EmqxApi], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    fake, api = fake_api
    rig = Sweep(api)
    # an empty page that still says "hasnext"
    fake.body = {"data": [], "meta": {"page": 1, "hasnext": True}}
    rig.suspect(11.0)
    await rig.sweep.sweep_once()
    assert len(fake.queries) == 1 and rig.sweep.pending_since() is None
    # full pages that always say "hasnext"
    monkeypatch.setattr(missed_connects, "MAX_PAGES", 3)
    fake.queries.clear()
    fake.body = {"data": [listed("same", 1, 11, 10_000_000)], "meta": {"hasnext": True}}
    rig.suspect(11.0)
    await rig.sweep.sweep_once()
    assert [q["page"] for q in fake.queries] == ["1", "2", "3"]
    assert rig.sweep.pending_since() is None
    truncated = [r for r in caplog.records if getattr(r, "event", None) == "missed_connect_sweep_truncated"]
    assert len(truncated) == 1
