"""Only EMQX's REST API publishes replays: an MQTT client that takes the clientid
"http_api" (its messages then have ``from = "http_api"`` too) and names a stored id in
the replay property is an ordinary publisher. Its message is stored, and its ack
deletes its own message, never the one it named. The broker tells the two apart by
the headers: an MQTT client's carry its protocol and address, a REST publish's none."""

from __future__ import annotations

from pathlib import Path

from exhook.emqx_api import REPLAY_PROPERTY
from tests.e2e.backends import SqliteBackend
from tests.e2e.harness import Harness
from tests.e2e.test_scenarios import payloads, publish_all


async def test_a_client_named_http_api_cannot_pass_its_message_off_as_a_replay(
        version: str, tmp_path: Path) -> None:
    backend = SqliteBackend(tmp_path)
    h = Harness(backend, version)
    await h.start()
    try:
        [victim] = await publish_all(h, [("t/sp", b"the victim's message")])
        spoofer = h.client("http_api")
        await spoofer.connect()
        await spoofer.subscribe("t/sp2", qos=1)  # to get its own message, and ack it
        await spoofer.publish("t/sp2", b"spoofed", qos=1, user_props=[(REPLAY_PROPERTY, victim)])
        await spoofer.wait_for_deliveries(1, timeout=10)
        await h.settle()
        assert payloads(spoofer) == [b"spoofed"]
        metrics = h.service.metrics
        assert metrics.sample("messages_stored_total") == 2  # the spoofed one too
        assert metrics.sample("messages_skipped_total", reason="replay") == 0
        assert await backend.count_messages() == 1  # its ack deleted its own message only
        survivor = h.client("sp-sub")
        await survivor.connect()
        await survivor.subscribe("t/sp", qos=1)
        await survivor.wait_for_deliveries(1, timeout=10)
        assert payloads(survivor) == [b"the victim's message"]
    finally:
        await h.stop()
