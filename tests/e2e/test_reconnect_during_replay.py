"""A client that connects again while the replay of its previous connection runs.

A replay is published to the topic, so one still running for the earlier connection
reaches the new one too, ahead of the new connection's own restore, which replays
from the oldest stored message again. The earlier replay stops before its next batch
once a later connect of the client has begun: the new connection then sees at most
that batch out of order (the harness replays in batches of 7)."""

from __future__ import annotations

import pytest

from tests.e2e.harness import Harness
from tests.e2e.test_scenarios import payloads, publish_all

REPLAY_BATCH = 7  # tests/e2e/harness.py: replay_batch_size
MESSAGES = 40


def in_order_after_one_batch(got: list[bytes]) -> bool:
    """Whether ``got`` is in publish order once at most one batch is skipped at its start."""
    return any(got[i:] == sorted(set(got[i:])) for i in range(REPLAY_BATCH + 1))


async def slowly_replayed_backlog(h: Harness, clientid: str, topic: str) -> list[bytes]:
    """A stored subscription of ``clientid`` and MESSAGES stored for it while it was
    away, replayed at ~10 ms a message (the payloads, in publish order)."""
    away = h.client(clientid)
    await away.connect()
    await away.subscribe(topic, qos=1)
    await away.disconnect()
    await h.settle()
    sent = [f"m{i:02d}".encode() for i in range(MESSAGES)]
    await publish_all(h, [(topic, p) for p in sent])
    assert h.emu is not None
    h.emu.hooks.answer_late("message.publish", "http_api", 0.01)
    return sent


@pytest.mark.parametrize("first_acks", [True, False])
async def test_a_replay_stops_when_its_client_connects_again(h: Harness, first_acks: bool) -> None:
    sent = await slowly_replayed_backlog(h, "again", "t/again")
    first = h.client("again")
    first.auto_ack = first_acks
    await first.connect()  # its restore replays the 40 messages
    await first.wait_for_deliveries(10, timeout=10)
    second = h.client("again")  # the device connects again (clean start) in the middle...
    await second.connect()
    await second.subscribe("t/again", qos=1)  # ...and subscribes itself, as apps do
    acked_by_first = set(payloads(first)) if first_acks else set()
    await second.wait_for_deliveries(MESSAGES - len(acked_by_first), timeout=20)
    await h.settle()  # the service's idle waits for the first replay's job: a late batch is in by now
    got = payloads(second)
    assert set(got) >= set(sent) - acked_by_first  # nothing missed
    assert in_order_after_one_batch(got), got
    assert len(got) - len(set(got)) <= REPLAY_BATCH, got


async def test_a_replay_goes_on_when_its_client_resumes_the_session(h: Harness) -> None:
    """A client that comes back and resumes its session (clean_start false) keeps the
    subscription the replay publishes to, and nothing else would replay the rest: the
    replay must not stop for it."""
    sent = await slowly_replayed_backlog(h, "resumer", "t/resume")
    fresh = h.client("resumer", clean_start=False, session_expiry=3600, proto_ver=5)
    await fresh.connect()  # a new session: restored, replaying the 40
    await fresh.wait_for_deliveries(10, timeout=10)
    resumed = h.client("resumer", clean_start=False, session_expiry=3600, proto_ver=5)
    await resumed.connect()  # takes the session over
    await resumed.wait_for_deliveries(MESSAGES - len(payloads(fresh)), timeout=20)
    await h.settle()
    assert set(payloads(fresh)) | set(payloads(resumed)) == set(sent)
