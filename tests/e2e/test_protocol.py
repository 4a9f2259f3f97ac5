"""The ExHook surface itself, called directly: what the service registers and what
it answers, for both proto packages."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from exhook.config import HostPort, load_config_string
from exhook.pb.v2 import exhook_pb2 as v2_pb2
from exhook.pb.v2 import exhook_pb2_grpc as v2_grpc
from exhook.pb.v3 import exhook_pb2 as v3_pb2
from exhook.pb.v3 import exhook_pb2_grpc as v3_grpc
from exhook.server import Service
from tests.e2e.backends import SqliteBackend

PACKAGES = {"v3": (v3_pb2, v3_grpc), "v2": (v2_pb2, v2_grpc)}


async def start(tmp_path: Path, topics: list[str]) -> Service:
    cfg = load_config_string(SqliteBackend(tmp_path).hocon(topics, 0, 1))
    listen = HostPort("127.0.0.1", 0)
    http = dataclasses.replace(cfg.service.http, listen=HostPort("127.0.0.1", 0))
    service = Service(dataclasses.replace(cfg, service=dataclasses.replace(cfg.service, listen=listen, http=http)))
    await service.start()
    return service


@pytest.fixture
async def tracked(tmp_path: Path) -> AsyncIterator[Service]:
    service = await start(tmp_path, ["t/#", "a/+/b"])
    yield service
    await service.stop()


@pytest.mark.parametrize("version", ["v3", "v2"])
async def test_registers_its_hooks_with_the_topics_on_message_hooks(tracked: Service, version: str) -> None:
    pb, stubs = PACKAGES[version]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{tracked.port}") as channel:
        loaded = await stubs.HookProviderStub(channel).OnProviderLoaded(pb.ProviderLoadedRequest())
    hooks = {h.name: list(h.topics) for h in loaded.hooks}
    assert hooks == {
        "session.created": [], "client.connected": [], "session.subscribed": [], "session.unsubscribed": [],
        "session.resumed": [],
        "message.publish": ["t/#", "a/+/b"], "message.acked": ["t/#", "a/+/b"],
    }


async def test_no_topics_means_no_hooks_at_all(tmp_path: Path) -> None:
    service = await start(tmp_path, [])
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
            loaded = await v3_grpc.HookProviderStub(channel).OnProviderLoaded(v3_pb2.ProviderLoadedRequest())
        assert list(loaded.hooks) == []
    finally:
        await service.stop()


@pytest.mark.parametrize("version", ["v3", "v2"])
async def test_answers_ignore_and_stores_only_qos12_on_tracked_topics(tracked: Service, version: str) -> None:
    pb, stubs = PACKAGES[version]
    cases: list[tuple[str, int, Any]] = [
        ("t/stored", 1, True), ("t/stored2", 2, True), ("t/qos0", 0, False),
        ("$SYS/brokers", 1, False), ("untracked", 1, False), ("a/x/b", 1, True), ("a/x/c", 1, False),
    ]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{tracked.port}") as channel:
        stub = stubs.HookProviderStub(channel)
        for i, (topic, qos, _) in enumerate(cases):
            message = pb.Message(id=f"{i + 1:032X}", qos=qos, topic=topic, payload=b"p", timestamp=1,
                                 **{"from": "c"})
            answer = await stub.OnMessagePublish(pb.MessagePublishRequest(message=message))
            assert answer.type == pb.ValuedResponse.IGNORE
            assert not answer.HasField("message")  # the message is never changed
    await tracked.idle()
    stored = await tracked._gate.latest_positions([topic for topic, _, _ in cases])  # type: ignore[union-attr]
    assert sorted(stored) == sorted(topic for topic, _, keep in cases if keep)
    assert tracked.metrics.sample("messages_stored_total") == 3
    skipped = {reason: tracked.metrics.sample("messages_skipped_total", reason=reason)
               for reason in ("qos0", "sys", "untracked", "replay")}
    assert skipped == {"qos0": 1, "sys": 1, "untracked": 2, "replay": 0}
