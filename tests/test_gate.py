"""The gate every hook call passes (issue 10 items 1 and 5): requests that cannot be
right, requests that do not decode, and callers outside ``exhook.allowed_clients``
are answered at once, counted, logged once per reason per minute, and store nothing.
Against the real service on SQLite, over real gRPC."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from exhook.config import HostPort, load_config_string
from exhook.pb.v3 import exhook_pb2 as pb
from exhook.pb.v3 import exhook_pb2_grpc as pb_grpc
from exhook.server import Service
from exhook.validate import MAX_STRING_BYTES, message_problem, subscribed_problem

GOOD_ID = "0005F1B4C2D1E2F30A0B0C0D0E0F1011"


def message(**fields: Any) -> Any:
    values = {"id": GOOD_ID, "qos": 1, "topic": "t/a", "payload": b"x", "timestamp": 1_700_000_000_000,
              "from": "c1", **fields}
    return pb.Message(**values)


@pytest.mark.parametrize(("fields", "reason"), [
    ({"qos": 255}, "bad_qos"),
    ({"qos": 3}, "bad_qos"),
    ({"timestamp": 2**64 - 1}, "bad_timestamp"),
    ({"id": "A" * 100}, "bad_msgid"),
    ({"id": "not-a-guid-not-a-guid-not-a-guid"}, "bad_msgid"),
    ({"id": ""}, "bad_msgid"),
    ({"topic": ""}, "bad_topic"),
    ({"topic": "t/\x00/a"}, "bad_topic"),
    ({"topic": "t/+/a"}, "bad_topic"),
    ({"topic": "t/#"}, "bad_topic"),
    ({"topic": "t/" + "x" * MAX_STRING_BYTES}, "bad_topic"),
    ({"topic": "t/" + "é" * 40_000}, "bad_topic"),  # 80,002 bytes in 40,002 characters
    ({"from": "a\x00b"}, "bad_sender"),
])
def test_a_message_that_cannot_be_right_names_its_reason(fields: dict[str, Any], reason: str) -> None:
    assert message_problem(message(**fields)) == reason


@pytest.mark.parametrize("fields", [
    {}, {"qos": 0}, {"qos": 2}, {"timestamp": 0}, {"id": GOOD_ID.lower()},
    {"topic": "t/" + "x" * 300}, {"topic": "x" * MAX_STRING_BYTES}, {"topic": "t/emoji/\U0001F600/ü"},
    {"topic": "t/'; DROP TABLE mqtt_msg; --"}, {"topic": "$SYS/brokers"}, {"from": ""},
])
def test_what_a_broker_sends_passes(fields: dict[str, Any]) -> None:
    assert message_problem(message(**fields)) is None


def test_a_subscription_needs_a_valid_filter_and_qos() -> None:
    def req(topic: str, qos: int = 1, clientid: str = "c") -> Any:
        return pb.SessionSubscribedRequest(clientinfo=pb.ClientInfo(clientid=clientid), topic=topic,
                                           subopts=pb.SubOpts(qos=qos))

    assert subscribed_problem(req("t/#")) is None
    assert subscribed_problem(req("$share/g/t/+")) is None
    assert subscribed_problem(req("t/#/x")) == "bad_filter"
    assert subscribed_problem(req("$share/g")) == "bad_filter"
    assert subscribed_problem(req("t/a", qos=7)) == "bad_qos"
    assert subscribed_problem(req("t/a", clientid="")) == "bad_clientid"
    assert subscribed_problem(req("t/a", clientid="c" * 70_000)) == "bad_clientid"


async def start_service(tmp_path: Path, extra: str = "", host: str = "127.0.0.1") -> Service:
    cfg = load_config_string(
        f'sqlite {{ enable = true, path = "{tmp_path}/db.sqlite3", topics = ["t/#"] }}\n'
        f'exhook {{ spool.path = "{tmp_path}/spool", {extra} }}')
    svc = dataclasses.replace(cfg.service, listen=HostPort(host, 0),
                              http=dataclasses.replace(cfg.service.http, enable=False))
    service = Service(dataclasses.replace(cfg, service=svc))
    await service.start()
    return service


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[Service]:
    service = await start_service(tmp_path)
    yield service
    await service.stop()


async def stored_count(service: Service) -> int:
    counts = await service._gate.store.count_messages(["t/a", "t/b"])
    return sum(counts.values())


async def test_bad_publishes_pass_unchanged_and_unstored_while_good_ones_are_stored(
        service: Service, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        stub = pb_grpc.HookProviderStub(channel)
        for _ in range(50):
            answer = await stub.OnMessagePublish(pb.MessagePublishRequest(message=message(qos=255)))
            assert answer.type == pb.ValuedResponse.IGNORE and not answer.HasField("message")
        await stub.OnMessagePublish(pb.MessagePublishRequest(message=message(timestamp=2**64 - 1)))
        good = await stub.OnMessagePublish(pb.MessagePublishRequest(message=message(topic="t/b")))
        assert good.type == pb.ValuedResponse.IGNORE
    metrics = service.metrics
    assert metrics.sample("requests_rejected_total", hook="message.publish", reason="bad_qos") == 50
    assert metrics.sample("requests_rejected_total", hook="message.publish", reason="bad_timestamp") == 1
    assert metrics.sample("messages_stored_total") == 1
    assert await stored_count(service) == 1
    lines = [r for r in caplog.records if getattr(r, "event", "") == "request_rejected"]
    assert [(r.hook, r.reason) for r in lines] == [("message.publish", "bad_qos"),  # type: ignore[attr-defined]
                                                   ("message.publish", "bad_timestamp")]
    assert all(r.exc_info is None for r in caplog.records)


async def test_bad_casts_get_invalid_argument_and_change_nothing(service: Service) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        stub = pb_grpc.HookProviderStub(channel)
        calls = [
            stub.OnMessageAcked(pb.MessageAckedRequest(clientinfo=pb.ClientInfo(clientid="c"),
                                                       message=message(id="zz"))),
            stub.OnSessionSubscribed(pb.SessionSubscribedRequest(
                clientinfo=pb.ClientInfo(clientid="c"), topic="t/#/bad", subopts=pb.SubOpts(qos=1))),
            stub.OnClientConnected(pb.ClientConnectedRequest(clientinfo=pb.ClientInfo(clientid="a\x00b"))),
        ]
        for call in calls:
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await call
            assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    metrics = service.metrics
    assert metrics.sample("requests_rejected_total", hook="message.acked", reason="bad_msgid") == 1
    assert metrics.sample("requests_rejected_total", hook="session.subscribed", reason="bad_filter") == 1
    assert metrics.sample("requests_rejected_total", hook="client.connected", reason="bad_clientid") == 1
    assert metrics.sample("messages_acked_total") == 0
    assert await service._gate.store.subscriptions("c") == []


async def test_an_undecodable_request_gets_invalid_argument_without_a_traceback(
        service: Service, caplog: pytest.LogCaptureFixture) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        for rpc in ("OnMessagePublish", "OnSessionSubscribed"):
            raw = channel.unary_unary(f"/emqx.exhook.v3.HookProvider/{rpc}",
                                      request_serializer=lambda b: b, response_deserializer=lambda b: b)
            if rpc == "OnMessagePublish":
                # the broker uses this answer: the message passes unchanged
                answer = pb.ValuedResponse.FromString(await raw(b"\xff\xff\xff\xff garbage"))
                assert answer.type == pb.ValuedResponse.IGNORE
                continue
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await raw(b"\xff\xff\xff\xff garbage")
            assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # and the service still answers a good call
        stub = pb_grpc.HookProviderStub(channel)
        await stub.OnMessagePublish(pb.MessagePublishRequest(message=message()))
    assert service.metrics.sample("requests_rejected_total", hook="message.publish", reason="undecodable") == 1
    assert service.metrics.sample("requests_rejected_total", hook="session.subscribed", reason="undecodable") == 1
    assert service.metrics.sample("messages_stored_total") == 1
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]


# grpc names an IPv6 caller "ipv6:%5B::1%5D:port" (brackets percent-encoded)
@pytest.mark.parametrize(("host", "target", "allowed", "admitted"), [
    ("127.0.0.1", "127.0.0.1", '"10.0.0.0/8"', False),
    ("127.0.0.1", "127.0.0.1", '"127.0.0.0/8", "::1"', True),
    ("::1", "[::1]", '"127.0.0.0/8"', False),
    ("::1", "[::1]", '"::1/128"', True),
])
async def test_only_allowed_clients_reach_the_hooks(
        tmp_path: Path, host: str, target: str, allowed: str, admitted: bool) -> None:
    service = await start_service(tmp_path, f"allowed_clients = [{allowed}]", host)
    try:
        async with grpc.aio.insecure_channel(f"{target}:{service.port}") as channel:
            stub = pb_grpc.HookProviderStub(channel)
            await stub.OnMessagePublish(pb.MessagePublishRequest(message=message()))
            subscribe = stub.OnSessionSubscribed(pb.SessionSubscribedRequest(
                clientinfo=pb.ClientInfo(clientid="c"), topic="t/a", subopts=pb.SubOpts(qos=1)))
            if admitted:
                await subscribe
            else:
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await subscribe
                assert failed.value.code() == grpc.StatusCode.PERMISSION_DENIED
        rejected = service.metrics.sample("requests_rejected_total", hook="message.publish", reason="not_allowed")
        assert rejected == (0 if admitted else 1)
        assert service.metrics.sample("messages_stored_total") == (1 if admitted else 0)
    finally:
        await service.stop()
