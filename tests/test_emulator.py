"""Tests of the EMQX emulator itself, against a small recording HookProvider (grpc.aio, v2 and v3)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import grpc
import pytest

from tests.emulator import AVAILABLE_HOOKS, ConnectRefused, EmqxEmulator, HookLoadError, pb_modules, timestamp_us

ALL = [(h, []) for h in AVAILABLE_HOOKS]


@dataclass
class Rec:
    rpc: str
    request: Any
    started: float
    finished: float | None = None


class Recorder:
    """A HookProvider that records every call; delays, answers and side effects are configurable."""

    def __init__(self, version: str, hooks: Sequence[tuple[str, Sequence[str]]]) -> None:
        self.pb, self.pb_grpc = pb_modules(version)
        self.hooks = hooks
        self.calls: list[Rec] = []
        self.delay: dict[str, Callable[[Any], float]] = {}
        self.before: dict[str, Callable[[Any], Awaitable[None]]] = {}
        self.publish_answer: Callable[[Any], Any] | None = None

    def servicer(self) -> Any:
        rec = self
        ns: dict[str, Any] = {}
        for rpc in (n for n in dir(self.pb_grpc.HookProviderServicer) if n.startswith("On")):

            async def handler(_self: Any, request: Any, context: Any, _rpc: str = rpc) -> Any:
                return await rec.handle(_rpc, request)

            ns[rpc] = handler
        return type("RecordingServicer", (self.pb_grpc.HookProviderServicer,), ns)()

    async def handle(self, rpc: str, request: Any) -> Any:
        entry = Rec(rpc, request, time.monotonic())
        self.calls.append(entry)
        if rpc in self.before:
            await self.before[rpc](request)
        if rpc in self.delay:
            seconds = self.delay[rpc](request)
            if seconds:
                await asyncio.sleep(seconds)
        entry.finished = time.monotonic()
        pb = self.pb
        if rpc == "OnProviderLoaded":
            return pb.LoadedResponse(hooks=[pb.HookSpec(name=n, topics=list(t)) for n, t in self.hooks])
        if rpc == "OnMessagePublish" and self.publish_answer is not None:
            return self.publish_answer(request)
        if rpc in ("OnMessagePublish", "OnClientAuthenticate", "OnClientAuthorize"):
            return pb.ValuedResponse(type=pb.ValuedResponse.IGNORE)
        return pb.EmptySuccess()

    def of(self, rpc: str) -> list[Any]:
        return [c.request for c in self.calls if c.rpc == rpc]

    def recs(self, rpc: str) -> list[Rec]:
        return [c for c in self.calls if c.rpc == rpc]

    def names(self, since: int = 0) -> list[str]:
        return [c.rpc for c in self.calls[since:]]


@contextlib.asynccontextmanager
async def harness(
    version: str, hooks: Sequence[tuple[str, Sequence[str]]] = ALL, **kw: Any
) -> AsyncIterator[tuple[Recorder, EmqxEmulator]]:
    rec = Recorder(version, hooks)
    server = grpc.aio.server()
    rec.pb_grpc.add_HookProviderServicer_to_server(rec.servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    kw.setdefault("net_delay", 0.002)
    emu = EmqxEmulator(f"127.0.0.1:{port}", version, api_key="k", api_secret="s", **kw)
    try:
        await emu.start()
        yield rec, emu
        assert emu.errors == []
    finally:
        await emu.stop()
        await server.stop(None)


@contextlib.asynccontextmanager
async def rest(emu: EmqxEmulator, auth: bool = True) -> AsyncIterator[aiohttp.ClientSession]:
    headers = {"Authorization": aiohttp.encode_basic_auth("k", "s")} if auth else {}
    async with aiohttp.ClientSession(base_url=emu.rest_url + "/", headers=headers) as s:
        yield s


async def post(s: aiohttp.ClientSession, path: str, body: Any) -> tuple[int, Any]:
    async with s.post(path, json=body) as r:
        return r.status, (await r.json() if r.status != 204 else None)


def peerport_of(request: Any) -> int | None:
    for name in ("clientinfo", "conninfo"):
        if name in request.DESCRIPTOR.fields_by_name:
            return int(getattr(request, name).peerport)
    return None


def conn_names(rec: Recorder, peerport: int | None, since: int = 0) -> list[str]:
    """The hooks one connection (identified by its peerport) made, in order."""
    return [c.rpc for c in rec.calls[since:] if peerport_of(c.request) == peerport]


def is_guid(value: str) -> bool:
    return len(value) == 32 and all(ch in "0123456789ABCDEF" for ch in value)


# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["v2", "v3"])
async def test_connect_subscribe_disconnect_order_and_client_info(version: str) -> None:
    # a v2 broker that sends peer ports (EMQX 5.4-5.8): this test tells connections apart by them
    async with harness(version, emqx_version=None if version == "v3" else "5.8.1") as (rec, emu):
        loaded = rec.of("OnProviderLoaded")[0]
        assert loaded.broker.version and loaded.broker.sysdescr == "EMQX" and loaded.meta.node == emu.node

        c = emu.client("c1", username="u1")
        assert await c.connect() is False
        assert rec.names(1) == [
            "OnClientConnect",
            "OnClientAuthenticate",
            "OnSessionCreated",
            "OnClientConnected",
            "OnClientConnack",
        ]
        info = rec.of("OnSessionCreated")[0].clientinfo
        assert (info.node, info.clientid, info.username, info.peerhost, info.sockport, info.protocol) == (
            "emqx@127.0.0.1",
            "c1",
            "u1",
            "127.0.0.1",
            1883,
            "mqtt",
        )
        assert info.peerport == c.peerport
        assert rec.of("OnClientConnected")[0].meta.node == "emqx@127.0.0.1"

        # session.subscribed runs after the route exists and before the SUBACK (a slow one delays it)
        route_seen: list[bool] = []

        async def check_route(req: Any) -> None:
            route_seen.append("c1" in emu.routes().get("t/#", []))

        rec.before["OnSessionSubscribed"] = check_route
        rec.delay["OnSessionSubscribed"] = lambda req: 0.15
        mark = len(rec.calls)
        t0 = time.monotonic()
        assert await c.subscribe("t/#", qos=1) == [1]
        assert time.monotonic() - t0 >= 0.15
        assert route_seen == [True]
        assert rec.names(mark) == ["OnClientAuthorize", "OnClientSubscribe", "OnSessionSubscribed"]
        sub = rec.of("OnSessionSubscribed")[0]
        assert (sub.topic, sub.subopts.qos) == ("t/#", 1)

        c2 = emu.client("c2")
        await c2.connect()
        assert c2.peerport != c.peerport

        mark = len(rec.calls)
        await c.disconnect()
        assert rec.names(mark) == ["OnClientDisconnected", "OnSessionTerminated"]
        assert rec.of("OnClientDisconnected")[0].reason == "normal"
        assert emu.routes() == {}


async def test_hookspec_topics_filter_message_hooks_and_unregistered_hooks_are_never_called() -> None:
    hooks = [("message.publish", ["t/#", "x/+"]), ("message.acked", ["t/#"])]
    async with harness("v3", hooks) as (rec, emu):
        c = emu.client("c1")
        await c.connect()
        await c.subscribe("#", qos=1)
        await c.subscribe("$SYS/#", qos=1)
        for topic in ("t/1", "other/x", "x/y", "x/y/z", "$SYS/brokers/x"):
            await c.publish(topic, b"p", qos=1)
        await c.wait_for_deliveries(5)
        await emu.settle()
        assert [r.message.topic for r in rec.of("OnMessagePublish")] == ["t/1", "x/y"]
        assert [r.message.topic for r in rec.of("OnMessageAcked")] == ["t/1"]
        assert set(rec.names(1)) == {"OnMessagePublish", "OnMessageAcked"}
        assert emu.count("client.connected") == 0 and emu.count("message.publish") == 2


async def test_unknown_hook_name_fails_loading() -> None:
    with pytest.raises(HookLoadError):
        async with harness("v3", [("message.publish", []), ("client.nonsense", [])]):
            pass


async def test_slow_hook_stalls_only_its_own_client() -> None:
    async with harness("v3", [("message.publish", []), ("session.subscribed", [])]) as (rec, emu):
        rec.delay["OnMessagePublish"] = lambda req: 0.4 if getattr(req.message, "from") == "slow" else 0
        slow, fast = emu.client("slow"), emu.client("fast")
        await slow.connect()
        await fast.connect()
        t0 = time.monotonic()
        slow_pub = asyncio.create_task(slow.publish("a/1", b"x", qos=1))
        await asyncio.sleep(0.05)
        slow_sub = asyncio.create_task(slow.subscribe("s/#"))
        await fast.subscribe("b/#", qos=1)
        await fast.publish("b/1", b"y", qos=1)
        await fast.wait_for_deliveries(1)
        fast_done = time.monotonic() - t0
        await slow_sub
        slow_sub_done = time.monotonic() - t0
        await slow_pub
        assert fast_done < 0.2, fast_done
        # the slow client's SUBSCRIBE waited for its own message.publish hook
        assert slow_sub_done >= 0.4, slow_sub_done
        hook_end = rec.recs("OnMessagePublish")[0].finished
        sub_start = rec.recs("OnSessionSubscribed")[-1].started
        assert rec.of("OnSessionSubscribed")[-1].clientinfo.clientid == "slow"
        assert hook_end is not None and sub_start >= hook_end
        assert emu.hooks.max_in_flight >= 2


async def test_rest_auth_bulk_validation_order_and_202() -> None:
    async with harness("v3", [("message.publish", [])]) as (rec, emu):
        rec.delay["OnMessagePublish"] = lambda req: 0.05
        sub = emu.client("sub")
        await sub.connect()
        await sub.subscribe("r/#", qos=1)
        good = {"topic": "r/1", "payload": "a"}
        async with rest(emu, auth=False) as s:
            status, body = await post(s, "publish/bulk", [good])
            assert status == 401 and body["code"] == "BAD_API_KEY_OR_SECRET"
        async with rest(emu) as s:
            bad_items = [
                ({"topic": "r/+", "payload": "x"}, {"reason_code": 144, "message": "topic_name_invalid"}),
                ({"topic": "r/1", "payload": "x", "qos": 3}, None),
                ({"topic": "r/1", "payload": "x", "retain": "yes"}, None),
                ({"topic": "r/1", "payload": "x", "payload_encoding": "hex"}, None),
                ({"payload": "x"}, None),
                ({"topic": "r/1", "payload": "!!!", "payload_encoding": "base64"}, 131),
            ]
            for item, expect in bad_items:
                status, body = await post(s, "publish/bulk", [good, item])
                assert status == 400, (item, body)
                if expect is None:
                    assert body["code"] == "BAD_REQUEST"
                elif isinstance(expect, int):
                    assert body["reason_code"] == expect
                else:
                    assert body == expect
            status, body = await post(s, "publish/bulk", [])
            assert status == 400
            assert emu.count("message.publish") == 0 and sub.deliveries == []

            items = [
                {"topic": "r/1", "payload": "a", "qos": 1},
                {"topic": "r/2", "payload": base64.b64encode(b"\x00\xff").decode(), "payload_encoding": "base64"},
                {"topic": "nobody/3", "payload": "c", "qos": 1},
                {"topic": "r/4", "payload": "d", "qos": 2, "retain": True},
            ]
            status, body = await post(s, "publish/bulk", items)
            assert status == 202
            assert body[2] == {"reason_code": 16, "message": "no_matching_subscribers"}
            ids = [body[i]["id"] for i in (0, 1, 3)]
            assert all(is_guid(i) for i in ids) and ids == sorted(ids)

            calls = rec.recs("OnMessagePublish")
            assert [c.request.message.topic for c in calls] == ["r/1", "r/2", "nobody/3", "r/4"]
            assert [c.request.message.id for c in calls[:2]] + [calls[3].request.message.id] == ids
            for c in calls:
                assert getattr(c.request.message, "from") == "http_api" and dict(c.request.message.headers) == {}
            # one hook round trip after the other
            for a, b in itertools.pairwise(calls):
                assert a.finished is not None and b.started >= a.finished

            got = await sub.wait_for_deliveries(3)
            assert [(d.topic, d.payload, d.msg_id) for d in got] == [
                ("r/1", b"a", ids[0]),
                ("r/2", b"\x00\xff", ids[1]),
                ("r/4", b"d", ids[2]),
            ]
            assert got[2].qos == 1 and got[2].retain is False  # min(2, sub qos 1); rap=0 clears retain
            # each message is delivered as soon as its own hook answered, not at the end of the batch
            assert got[0].received_at < calls[3].started

            status, body = await post(s, "publish/bulk", [{"topic": "r/9", "payload": "z"}])
            assert status == 200 and list(body[0]) == ["id"]
            status, body = await post(s, "publish", {"topic": "nobody/1", "payload": "z"})
            assert (status, body) == (202, {"reason_code": 16, "message": "no_matching_subscribers"})
        assert len(emu.bulk_bodies) == 1 + len(bad_items) + 1 + 1 + 1
        assert emu.bulk_bodies[-2] == items


async def test_rest_subscribe_from_inside_a_hook_is_applied_after_it_returns() -> None:
    hooks = [("client.connected", []), ("session.subscribed", []), ("message.publish", [])]
    async with harness("v3", hooks) as (rec, emu):
        inside: list[tuple[int, Any]] = []

        async def on_connected(req: Any) -> None:
            async with rest(emu) as s:
                cid = req.clientinfo.clientid
                inside.append(await post(s, f"clients/{cid}/subscribe/bulk", [{"topic": "late/#", "qos": 1}]))
                inside.append(await post(s, "publish", {"topic": "late/1", "payload": "lost"}))

        rec.before["OnClientConnected"] = on_connected
        c = emu.client("c1")
        await c.connect()
        status, body = inside[0]
        assert status == 200
        assert body == [{"topic": "late/#", "qos": 1, "nl": 0, "rap": 0, "rh": 0, "node": emu.node, "clientid": "c1"}]
        assert inside[1] == (202, {"reason_code": 16, "message": "no_matching_subscribers"})
        await emu.settle()
        subscribed = rec.recs("OnSessionSubscribed")
        assert [r.request.topic for r in subscribed] == ["late/#"]
        connected_end = rec.recs("OnClientConnected")[0].finished
        assert connected_end is not None and subscribed[0].started >= connected_end
        async with rest(emu) as s:
            assert await post(s, "publish", {"topic": "late/2", "payload": "kept", "qos": 1}) == (
                200,
                {"id": rec.of("OnMessagePublish")[-1].message.id},
            )
            status, body = await post(s, "clients/nobody/subscribe", {"topic": "a", "qos": 1})
            assert (status, body["code"]) == (404, "CLIENTID_NOT_FOUND")
            status, body = await post(s, "clients/nobody/subscribe/bulk", [{"topic": "a"}])
            assert (status, body["code"]) == (404, "CLIENTID_NOT_FOUND")
        got = await c.wait_for_deliveries(1)
        assert [d.payload for d in got] == [b"kept"]
        # REST subscribe fires session.subscribed only (no client.subscribe), every time, even when it exists
        async with rest(emu) as s:
            assert (await post(s, "clients/c1/subscribe", {"topic": "late/#", "qos": 1}))[0] == 200
        await emu.settle()
        assert [r.request.topic for r in rec.recs("OnSessionSubscribed")] == ["late/#", "late/#"]


@pytest.mark.parametrize("version", ["v2", "v3"])
async def test_persistent_session_resume_queues_offline_messages(version: str) -> None:
    async with harness(version, emqx_version=None if version == "v3" else "5.8.1") as (rec, emu):
        p = emu.client("p", clean_start=False, session_expiry=60)
        assert await p.connect() is False
        await p.subscribe("q/#", qos=2)
        await p.disconnect()
        pub = emu.client("pub")
        await pub.connect()
        ids = [
            await pub.publish("q/1", b"1", qos=1),
            await pub.publish("q/2", b"2", qos=2),
            await pub.publish("q/3", b"3", qos=0),
        ]
        await emu.settle()
        assert p.deliveries == []

        mark = len(rec.calls)
        assert await p.connect() is True
        await p.wait_for_deliveries(3)
        await emu.settle()
        mine = [n for n in conn_names(rec, p.peerport, mark) if n != "OnMessageDelivered"]
        assert mine[:5] == [
            "OnClientConnect",
            "OnClientAuthenticate",
            "OnSessionResumed",
            "OnClientConnected",
            "OnClientConnack",
        ]
        assert "OnSessionCreated" not in mine and "OnSessionSubscribed" not in mine
        assert [(d.topic, d.msg_id, d.qos) for d in p.deliveries] == [
            ("q/1", ids[0], 1),
            ("q/2", ids[1], 2),
            ("q/3", ids[2], 0),
        ]
        acked = rec.of("OnMessageAcked")
        assert [(a.message.id, a.message.qos, a.clientinfo.clientid) for a in acked] == [
            (ids[0], 1, "p"),
            (ids[1], 2, "p"),
        ]

        # another device with the same clientid takes the live session over
        p2 = emu.client("p", clean_start=False, session_expiry=60)
        mark = len(rec.calls)
        assert await p2.connect() is True
        await emu.settle()
        assert "OnSessionResumed" in conn_names(rec, p2.peerport, mark)
        assert p.connected is False and p.disconnect_reason == "takenover"
        assert conn_names(rec, p.peerport, mark) == ["OnClientDisconnected", "OnSessionTakenover"]
        assert rec.of("OnClientDisconnected")[-1].reason == "takenover"
        assert list(emu.subscriptions("p")) == ["q/#"]

        # a clean start discards it
        p3 = emu.client("p", clean_start=True)
        mark = len(rec.calls)
        assert await p3.connect() is False
        await emu.settle()
        assert p2.connected is False and p2.disconnect_reason == "discarded"
        assert conn_names(rec, p2.peerport, mark) == ["OnClientDisconnected", "OnSessionDiscarded"]
        assert rec.of("OnClientDisconnected")[-1].reason == "discarded"
        assert conn_names(rec, p3.peerport, mark) == [
            "OnClientConnect",
            "OnClientAuthenticate",
            "OnSessionCreated",
            "OnClientConnected",
            "OnClientConnack",
        ]
        assert emu.subscriptions("p") == {}


async def test_acks_only_for_qos_above_zero_with_the_delivered_id_one_round_trip_later() -> None:
    async with harness("v3", [("message.acked", [])], net_delay=0.02) as (rec, emu):
        sub = emu.client("sub")
        await sub.connect()
        await sub.subscribe([("a/#", 2), ("b/#", 0)])
        pub = emu.client("pub", net_delay=0.001)
        await pub.connect()
        ids = [
            await pub.publish("a/1", b"", qos=1),
            await pub.publish("a/2", b"", qos=2),
            await pub.publish("b/1", b"", qos=1),
            await pub.publish("a/3", b"", qos=0),
        ]
        got = await sub.wait_for_deliveries(4)
        await emu.settle()
        assert [(d.topic, d.qos, d.msg_id) for d in got] == [
            ("a/1", 1, ids[0]),
            ("a/2", 2, ids[1]),
            ("b/1", 0, ids[2]),
            ("a/3", 0, ids[3]),
        ]
        acked = rec.recs("OnMessageAcked")
        assert [(r.request.message.id, r.request.message.qos) for r in acked] == [(ids[0], 1), (ids[1], 2)]
        for r, d in zip(acked, got, strict=False):
            assert r.started - d.received_at >= 0.018  # the PUBACK/PUBREC needs one more trip

        # auto_ack=False holds the acks
        held = emu.client("held", auto_ack=False)
        await held.connect()
        await held.subscribe("c/#", qos=1)
        cid = await pub.publish("c/1", b"", qos=1)
        await held.wait_for_deliveries(1)
        await emu.settle()
        assert len(rec.recs("OnMessageAcked")) == 2 and len(held.pending_acks) == 1
        held.ack_all()
        await emu.settle()
        assert rec.of("OnMessageAcked")[-1].message.id == cid
        assert rec.of("OnMessageAcked")[-1].clientinfo.clientid == "held"


async def test_inflight_window_holds_further_qos1_deliveries_until_acked() -> None:
    async with harness("v3", [("message.acked", [])], max_inflight=2) as (rec, emu):
        sub = emu.client("sub", auto_ack=False)
        await sub.connect()
        await sub.subscribe("w/#", qos=1)
        pub = emu.client("pub")
        await pub.connect()
        for i in range(4):
            await pub.publish(f"w/{i}", b"", qos=1)
        await emu.settle()
        assert [d.topic for d in sub.deliveries] == ["w/0", "w/1"]
        sub.ack(sub.pending_acks[0])
        await sub.wait_for_deliveries(3)
        sub.ack_all()
        await sub.wait_for_deliveries(4)
        sub.ack_all()
        await emu.settle()
        assert [d.topic for d in sub.deliveries] == ["w/0", "w/1", "w/2", "w/3"]
        assert len(rec.of("OnMessageAcked")) == 4


@pytest.mark.parametrize("version", ["v2", "v3"])
async def test_user_properties_reach_the_hook_only_in_v3_and_always_the_subscriber(version: str) -> None:
    async with harness(version, [("message.publish", [])]) as (rec, emu):
        sub = emu.client("sub")
        await sub.connect()
        await sub.subscribe("u/#", qos=1)
        pub = emu.client("pub", username="alice")
        await pub.connect()
        await pub.publish("u/1", b"x", qos=1, user_props=[("b", "2"), ("a", "1")])
        async with rest(emu) as s:
            body = {
                "topic": "u/2",
                "payload": "y",
                "properties": {"user_properties": {"z": "9", "k": "1"}, "message_expiry_interval": 60},
            }
            assert (await post(s, "publish", body))[0] == 200
        got = await sub.wait_for_deliveries(2)
        assert got[0].user_props == {"b": "2", "a": "1"} and got[0].user_props_list == [("b", "2"), ("a", "1")]
        assert got[1].user_props_list == [("k", "1"), ("z", "9")]
        reqs = rec.of("OnMessagePublish")
        assert dict(reqs[0].message.headers) == {"protocol": "mqtt", "peerhost": "127.0.0.1", "username": "alice"}
        assert getattr(reqs[0].message, "from") == "pub"
        if version == "v3":
            assert [(p.name, p.value) for p in reqs[0].user_props] == [("b", "2"), ("a", "1")]
            assert [(p.name, p.value) for p in reqs[1].user_props] == [("k", "1"), ("z", "9")]
            assert [(p.name, p.value) for p in reqs[1].props] == [("Message-Expiry-Interval", "60")]
        else:
            assert "user_props" not in reqs[0].DESCRIPTOR.fields_by_name


async def test_message_publish_answers_and_timeout() -> None:
    async with harness("v3", [("message.publish", [])], request_timeout=0.2) as (rec, emu):
        pb = rec.pb

        def answer(req: Any) -> Any:
            m = req.message
            if m.payload == b"rewrite":
                new = pb.Message(topic="w/rewritten", payload=b"new", qos=0)
                return pb.ValuedResponse(type=pb.ValuedResponse.CONTINUE, message=new)
            if m.payload == b"stop":
                new = pb.Message(topic=m.topic, payload=b"stopped", qos=m.qos)
                return pb.ValuedResponse(type=pb.ValuedResponse.STOP_AND_RETURN, message=new)
            if m.payload == b"block":
                new = pb.Message(topic=m.topic, payload=m.payload, qos=m.qos, headers={"allow_publish": "false"})
                return pb.ValuedResponse(type=pb.ValuedResponse.CONTINUE, message=new)
            if m.payload == b"bool":
                return pb.ValuedResponse(type=pb.ValuedResponse.CONTINUE, bool_result=False)
            if m.payload == b"empty":
                return pb.ValuedResponse(type=pb.ValuedResponse.CONTINUE)
            return pb.ValuedResponse(type=pb.ValuedResponse.IGNORE)

        rec.publish_answer = answer
        rec.delay["OnMessagePublish"] = lambda req: 0.5 if req.message.payload == b"slow" else 0
        sub = emu.client("sub")
        await sub.connect()
        await sub.subscribe("w/#", qos=1)
        pub = emu.client("pub")
        await pub.connect()
        t0 = time.monotonic()
        for payload in (b"rewrite", b"ignore", b"stop", b"block", b"bool", b"empty", b"slow"):
            await pub.publish("w/in", payload, qos=1)
        assert time.monotonic() - t0 < 0.45  # the slow call was abandoned at request_timeout
        got = await sub.wait_for_deliveries(6)
        await emu.settle()
        assert [(d.topic, d.payload, d.qos) for d in got] == [
            ("w/rewritten", b"new", 0),
            ("w/in", b"ignore", 1),
            ("w/in", b"stopped", 1),
            ("w/in", b"bool", 1),
            ("w/in", b"empty", 1),
            ("w/in", b"slow", 1),
        ]
        answers = [c.answer for c in emu.calls_of("message.publish")]
        assert answers[0] == "CONTINUE+message" and answers[1] == "IGNORE"
        assert answers[4].startswith("CONTINUE(unknown") and answers[6].startswith("failed(timeout")
        assert pub.publish_results[3][1] == 0x10  # blocked: no matching subscribers


async def test_overlapping_subscriptions_get_one_copy_per_route_and_shared_groups_round_robin() -> None:
    async with harness("v3", [("session.subscribed", [])]) as (rec, emu):
        o = emu.client("o")
        await o.connect()
        await o.subscribe([("s/#", 1), ("s/+", 0)])
        g1, g2 = emu.client("g1"), emu.client("g2")
        for g in (g1, g2):
            await g.connect()
            await g.subscribe("$share/grp/s/#", qos=1)
        assert [r.topic for r in rec.of("OnSessionSubscribed")][-1] == "$share/grp/s/#"
        pub = emu.client("pub")
        await pub.connect()
        ids = [await pub.publish(f"s/{i}", b"", qos=1) for i in range(4)]
        await o.wait_for_deliveries(8)
        await g1.wait_for_deliveries(2)
        await g2.wait_for_deliveries(2)
        await emu.settle()
        assert sorted((d.msg_id, d.qos) for d in o.deliveries) == sorted([(i, 1) for i in ids] + [(i, 0) for i in ids])
        assert len(g1.deliveries) == 2 and len(g2.deliveries) == 2
        assert {d.msg_id for d in g1.deliveries + g2.deliveries} == set(ids)


async def test_message_ids_and_pool_routing_by_clientid() -> None:
    async with harness("v3", [("message.publish", []), ("client.connected", [])], pool_size=4) as (rec, emu):
        c = emu.client("dev-1")
        await c.connect()
        ids = [await c.publish("i/x", b"", qos=0) for _ in range(50)]
        assert all(is_guid(i) for i in ids)
        assert ids == sorted(ids) and len(set(ids)) == 50
        assert abs(timestamp_us(ids[0]) / 1e6 - time.time()) < 5
        ts = [r.message.timestamp for r in rec.of("OnMessagePublish")]
        assert abs(ts[0] / 1000 - time.time()) < 5
        expected = zlib.crc32(b"dev-1") % 4
        assert {c.channel for c in emu.calls_of("message.publish")} == {expected}
        assert {c.channel for c in emu.calls_of("client.connected")} == {expected}
        async with rest(emu) as s:
            await post(s, "publish", {"topic": "i/y", "payload": ""})
        assert emu.calls_of("message.publish")[-1].key == "http_api"


async def test_unacked_delivery_is_resent_with_dup_on_resume_and_session_expires() -> None:
    async with harness("v3", [("message.acked", []), ("session.terminated", [])]) as (rec, emu):
        p = emu.client("p", clean_start=False, session_expiry=0.3, auto_ack=False)
        await p.connect()
        await p.subscribe("d/#", qos=1)
        pub = emu.client("pub")
        await pub.connect()
        mid = await pub.publish("d/1", b"x", qos=1)
        first = (await p.wait_for_deliveries(1))[0]
        assert (first.msg_id, first.dup) == (mid, False)
        await p.disconnect()  # never acked: stays inflight in the session
        assert await p.connect() is True
        again = (await p.wait_for_deliveries(2))[1]
        assert (again.msg_id, again.dup, again.packet_id) == (mid, True, first.packet_id)
        p.ack(again)
        await emu.settle()
        assert [a.message.id for a in rec.of("OnMessageAcked")] == [mid]

        await p.disconnect()
        await asyncio.sleep(0.45)
        await emu.settle()
        assert [r.reason for r in rec.of("OnSessionTerminated")] == ["expired"]
        assert emu.subscriptions("p") == {} and emu.routes() == {}
        assert await emu.client("p", clean_start=False, session_expiry=60).connect() is False


async def test_unsubscribe_fires_session_unsubscribed_and_removes_the_route() -> None:
    async with harness("v2", [("client.unsubscribe", []), ("session.unsubscribed", [])]) as (rec, emu):
        c = emu.client("c")
        await c.connect()
        await c.subscribe(["a/#", "b"])
        assert await c.unsubscribe(["a/#", "nope"]) == [0, 0x11]
        assert rec.names(1) == ["OnClientUnsubscribe", "OnSessionUnsubscribed"]
        assert rec.of("OnSessionUnsubscribed")[0].topic == "a/#"
        assert emu.routes() == {"b": ["c"]}


@pytest.mark.parametrize("failed_action", ["deny", "ignore"])
async def test_failed_action_applies_to_folded_hooks(failed_action: str) -> None:
    hooks = [("client.authenticate", []), ("message.publish", [])]
    async with harness("v3", hooks, failed_action=failed_action) as (rec, emu):

        async def broken(req: Any) -> None:
            raise RuntimeError("service bug")

        rec.before["OnClientAuthenticate"] = broken
        rec.before["OnMessagePublish"] = broken
        c = emu.client("c")
        if failed_action == "deny":
            with pytest.raises(ConnectRefused):
                await c.connect()
            return
        await c.connect()
        await c.subscribe("f/#")
        await c.publish("f/1", b"still published", qos=1)
        got = await c.wait_for_deliveries(1)
        assert got[0].payload == b"still published"
        assert [x.status for x in emu.calls_of("message.publish")] == ["error"]


@pytest.mark.parametrize(("emqx_version", "sends"), [("5.3.2", False), ("5.4.0", True), ("5.8.1", True)])
async def test_emqx_before_5_4_sends_no_peer_port(emqx_version: str, sends: bool) -> None:
    async with harness("v2", emqx_version=emqx_version) as (rec, emu):
        c = emu.client("c1")
        await c.connect()
        await c.disconnect()
        await c.connect()
        ports = [req.clientinfo.peerport for req in rec.of("OnClientConnected")]
        conn_ports = [req.conninfo.peerport for req in rec.of("OnClientConnect")]
        if sends:
            assert len(set(ports)) == 2 and 0 not in ports and conn_ports == ports
        else:
            assert ports == [0, 0] and conn_ports == [0, 0]
