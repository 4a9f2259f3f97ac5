"""The v2 pending-replay registry (EMQX 5.0-5.8 hide the replay's user property from
``message.publish``): an entry lives only as long as the publish/bulk call that sent
its replay, so a replay whose hook call the broker gave up on cannot later take an
identical publish of someone else's for a replay (and leave it unstored)."""

from __future__ import annotations

import aiohttp
import grpc
import pytest

from exhook.emqx_api import basic_auth
from tests.e2e.harness import API_KEY, API_SECRET, Harness
from tests.e2e.test_scenarios import payloads, publish_all
from tests.hook_calls import message, new_id, publish_request, stub, subscribed_request

pytestmark = [pytest.mark.parametrize("backend_name", ["sqlite", "redis", "mysql"]),
              pytest.mark.parametrize("version", ["v2"])]


async def rest_publish(h: Harness, topic: str, payload: str) -> None:
    """An application's QoS 1 publish through EMQX's REST API (from = http_api, like a replay)."""
    async with aiohttp.ClientSession(headers={"Authorization": basic_auth(API_KEY, API_SECRET)}) as session:
        async with session.post(f"http://127.0.0.1:{h.rest_port}/api/v5/publish",
                                json={"topic": topic, "payload": payload, "qos": 1}) as answer:
            assert answer.status in (200, 202), await answer.text()


async def test_a_replay_whose_hook_call_was_lost_does_not_swallow_a_later_identical_rest_publish(
        h: Harness) -> None:
    assert h.emu is not None
    await publish_all(h, [("t/lamp", b"ON")])
    sub = h.client("lampsub")
    await sub.connect()
    h.emu.hooks.fail("message.publish", key="http_api")  # the replay's hook call is lost; the broker carries on
    await sub.subscribe("t/lamp", qos=1)
    await sub.wait_for_deliveries(1, timeout=5)
    await sub.disconnect()
    await h.settle()
    assert payloads(sub) == [b"ON"]
    before = await h.backend.count_messages()  # the original: nothing re-keyed it, so the ack missed it
    await rest_publish(h, "t/lamp", "ON")  # the same content again, nobody online
    await h.settle()
    assert await h.backend.count_messages() == before + 1
    assert h.service.metrics.sample("messages_skipped_total", reason="replay") == 0


async def test_a_replay_recognised_by_another_instance_leaves_no_entry_in_the_one_that_sent_it(
        h: Harness) -> None:
    other = await h.start_service(port=0)  # a second instance on the same store
    await publish_all(h, [("t/multi", b"x")])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{other.port}") as channel:
        hooks = stub(channel, h.version)
        # the broker's calls reach `other` too (it learns the broker is v2 from a message.publish) ...
        await hooks.OnMessagePublish(publish_request(h.version, message(h.version, new_id(), "t/x", b"", qos=0)))
        # ... and a session.subscribed: `other` replays through the REST API, and the replay's
        # message.publish reaches the broker's instance, which recognises it from the store
        await hooks.OnSessionSubscribed(subscribed_request(h.version, "roaming", "t/multi"))
        await other.idle()
        await h.settle()
        assert h.service.metrics.sample("messages_skipped_total", reason="replay") == 1
        stored = await h.backend.count_messages()
        # later an application publishes the same content; its hook call reaches `other`
        await hooks.OnMessagePublish(
            publish_request(h.version, message(h.version, new_id(), "t/multi", b"x", sender="http_api")))
    await other.idle()
    assert await h.backend.count_messages() == stored + 1
    assert other.metrics.sample("messages_skipped_total", reason="replay") == 0
