"""The offline-message scenarios, end to end: EMQX emulator -> service -> real
store, for every backend and both ExHook versions."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from exhook.emqx_api import REPLAY_PROPERTY
from exhook.server import Service
from tests.e2e.harness import Harness
from tests.e2e.test_health import eventually


async def publish_all(h: Harness, topic_payloads: list[tuple[str, bytes]], qos: int = 1) -> list[str]:
    pub = h.client("publisher")
    await pub.connect()
    ids = [await pub.publish(topic, payload, qos=qos) for topic, payload in topic_payloads]
    await pub.disconnect()
    await h.settle()
    return ids


def payloads(client) -> list[bytes]:  # type: ignore[no-untyped-def]
    return [d.payload for d in client.deliveries]


async def test_first_new_subscriber_gets_the_message_a_second_does_not(h: Harness) -> None:
    await publish_all(h, [("t/1", b"hello offline")])
    assert await h.backend.count_messages() == 1

    first = h.client("first")
    await first.connect()
    await first.subscribe("t/1", qos=1)
    await first.wait_for_deliveries(1, timeout=10)
    await h.settle()
    assert payloads(first) == [b"hello offline"]
    assert await h.backend.count_messages() == 0

    second = h.client("second")
    await second.connect()
    await second.subscribe("t/1", qos=1)
    await h.settle()
    assert payloads(second) == []


async def test_clean_session_reconnect_restores_subscription_and_messages(h: Harness) -> None:
    sub = h.client("returning")
    await sub.connect()
    await sub.subscribe("t/r", qos=1)
    await sub.disconnect()
    await h.settle()

    await publish_all(h, [("t/r", b"while away")])
    await sub.connect()  # clean start: the broker forgot the subscription; the service restores it
    await sub.wait_for_deliveries(1, timeout=10)
    await h.settle()
    assert payloads(sub) == [b"while away"]
    assert h.emu is not None and "t/r" in h.emu.subscriptions("returning")

    await sub.disconnect()
    sub.deliveries.clear()
    await sub.connect()
    await h.settle()
    assert payloads(sub) == []  # acknowledged: not replayed again
    await publish_all(h, [("t/r", b"live")])
    await sub.wait_for_deliveries(1, timeout=10)
    assert payloads(sub) == [b"live"]


async def test_a_replay_acked_at_once_costs_one_store_write(make_harness) -> None:  # type: ignore[no-untyped-def]
    # held long enough for any host: the ack, not the hold running out, ends it
    h: Harness = await make_harness(extra_hocon="exhook.replay_rekey_hold = 10s")
    await publish_all(h, [("t/once", b"one write")])
    sub = h.client("acks-at-once")
    await sub.connect()
    await sub.subscribe("t/once", qos=1)
    await sub.wait_for_deliveries(1, timeout=10)
    metrics = h.service.metrics

    async def acked() -> bool:
        return metrics.sample("messages_acked_total") >= 1
    await eventually(acked)
    assert metrics.sample("rekeys_merged_total") == 1  # the ack took the re-key back
    await h.settle()
    assert await h.backend.count_messages() == 0
    assert metrics.sample("messages_rekeyed_total") == 0


async def test_with_several_workers_a_replays_rekey_is_not_held(make_harness) -> None:  # type: ignore[no-untyped-def]
    # most acks would reach another worker: holding would only keep acked copies readable longer
    h: Harness = await make_harness(extra_hocon="exhook.replay_rekey_hold = 10s")
    await h.services.pop(0).stop()
    cfg = h.config()
    service = Service(dataclasses.replace(cfg, service=dataclasses.replace(cfg.service, workers=2)))
    await service.start()
    h.services.append(service)
    await publish_all(h, [("t/workers", b"two")])
    sub = h.client("acks-elsewhere")
    await sub.connect()
    await sub.subscribe("t/workers", qos=1)
    await sub.wait_for_deliveries(1, timeout=10)
    await h.settle()
    assert await h.backend.count_messages() == 0
    assert service.metrics.sample("messages_rekeyed_total") == 1
    assert service.metrics.sample("rekeys_merged_total") == 0


async def test_200_messages_replay_complete_in_order_without_duplicates(h: Harness) -> None:
    sent = [("t/order", f"m{i:03d}".encode()) for i in range(200)]
    await publish_all(h, sent)
    sub = h.client("orderly")
    await sub.connect()
    await sub.subscribe("t/order", qos=1)
    await sub.wait_for_deliveries(200, timeout=30)
    await h.settle()
    assert payloads(sub) == [p for _, p in sent]
    assert await h.backend.count_messages() == 0


async def test_store_is_empty_after_subscribe_replay_ack_unsubscribe(h: Harness) -> None:
    await publish_all(h, [("t/clean", b"a"), ("t/clean", b"b")])
    sub = h.client("tidy")
    await sub.connect()
    await sub.subscribe("t/clean", qos=1)
    await sub.wait_for_deliveries(2, timeout=10)
    await sub.unsubscribe("t/clean")
    await h.settle()
    assert await h.backend.count_messages() == 0
    assert await h.backend.count_subscriptions() == 0
    layout_keys = getattr(h.backend, "layout_keys", None)
    if layout_keys is not None:
        assert await layout_keys() == []


async def test_wildcard_subscription_gets_messages_in_arrival_order(h: Harness) -> None:
    # "w" itself matches "w/#" (MQTT: # also matches the parent level)
    sent = [("w", b"0"), ("w/a/1", b"1"), ("w/b/2", b"2"), ("w/a/1", b"3"), ("w/c", b"4"), ("w/b/deep/x", b"5")]
    await publish_all(h, sent)
    plus = h.client("plus")
    await plus.connect()
    await plus.subscribe("w/+/1", qos=1)
    await plus.wait_for_deliveries(2, timeout=10)
    await h.settle()
    assert payloads(plus) == [b"1", b"3"]

    hash_ = h.client("hash")
    await hash_.connect()
    await hash_.subscribe("w/#", qos=1)
    await hash_.wait_for_deliveries(4, timeout=10)
    await h.settle()
    assert payloads(hash_) == [b"0", b"2", b"4", b"5"]  # the rest were acknowledged by "plus"


async def test_shared_subscription_gets_stored_messages(h: Harness) -> None:
    await publish_all(h, [("s/1", b"shared-a"), ("s/1", b"shared-b")])
    member = h.client("member")
    await member.connect()
    await member.subscribe("$share/group/s/+", qos=1)
    await member.wait_for_deliveries(2, timeout=10)
    await h.settle()
    assert payloads(member) == [b"shared-a", b"shared-b"]
    assert await h.backend.count_messages() == 0


async def test_qos0_and_untracked_topics_are_not_stored(h: Harness) -> None:
    await publish_all(h, [("t/q0", b"zero")], qos=0)
    await publish_all(h, [("untracked/x", b"other"), ("x/1/z", b"other")], qos=1)
    assert await h.backend.count_messages() == 0
    assert h.emu is not None
    # the broker was told to send tracked topics only: it never asked about untracked/x
    published_topics = {c.request.message.topic for c in h.emu.calls_of("message.publish")}
    assert "untracked/x" not in published_topics and "x/1/z" not in published_topics


async def test_replays_are_recognised_and_not_stored_again(h: Harness) -> None:
    await publish_all(h, [("t/once", b"1"), ("t/once", b"2")])
    sub = h.client("holder", auto_ack=False)
    await sub.connect()
    await sub.subscribe("t/once", qos=1)
    await sub.wait_for_deliveries(2, timeout=10)
    await h.settle()
    assert await h.backend.count_messages() == 2  # not 4: the replays were not stored again
    assert h.service.metrics.sample("messages_skipped_total", reason="replay") == 2
    items = h.bulk_items()
    assert [item["retain"] for item in items] == [False, False]
    assert all(REPLAY_PROPERTY in item["properties"]["user_properties"] for item in items)  # type: ignore[index]
    sub.ack_all()
    await h.settle()
    assert await h.backend.count_messages() == 0  # the acks carried the replays' new ids


async def test_ack_of_a_replay_deletes_the_original_across_a_restart(h: Harness) -> None:
    await publish_all(h, [("t/restart", b"survivor")])
    sub = h.client("patient", auto_ack=False)
    await sub.connect()
    await sub.subscribe("t/restart", qos=1)
    await sub.wait_for_deliveries(1, timeout=10)
    await h.settle()
    await h.restart_service()
    sub.ack_all()
    await h.settle()
    assert await h.backend.count_messages() == 0
    again = h.client("later")
    await again.connect()
    await again.subscribe("t/restart", qos=1)
    await h.settle()
    assert payloads(again) == []


async def test_ack_through_another_instance_deletes_the_replayed_message(h: Harness) -> None:
    other = await h.start_service(port=0)  # a second instance on the same store
    await publish_all(h, [("t/multi", b"x")])
    sub = h.client("roaming", auto_ack=False)
    await sub.connect()
    await sub.subscribe("t/multi", qos=1)
    await sub.wait_for_deliveries(1, timeout=10)
    await h.settle()
    delivered = sub.deliveries[0]
    # the broker's connection for this subscriber now reaches the other instance
    from tests.e2e.direct import send_ack

    await send_ack(other.port, h.version, "roaming", delivered.msg_id, delivered.topic, "http_api")
    await other.idle()
    assert await h.backend.count_messages() == 0


# Expiry is read by each store kind (sentinel reads as single Redis does) and is the
# same for both protocols; each case waits 2 s for a message to expire.
@pytest.mark.parametrize("version", ["v3"])
@pytest.mark.parametrize("backend_name", ["sqlite", "mysql", "redis", "redis-cluster"])
async def test_expired_messages_are_not_replayed(make_harness) -> None:  # type: ignore[no-untyped-def]
    h = await make_harness(message_ttl=1)
    await publish_all(h, [("t/old", b"stale")])
    await asyncio.sleep(2.2)
    sub = h.client("late")
    await sub.connect()
    await sub.subscribe("t/old", qos=1)
    await h.settle()
    assert payloads(sub) == []


async def test_reconnect_and_own_subscribe_get_each_message_once(h: Harness) -> None:
    sub = h.client("eager")
    await sub.connect()
    await sub.subscribe("t/race", qos=1)
    await sub.disconnect()
    await h.settle()
    await publish_all(h, [("t/race", f"r{i}".encode()) for i in range(5)])
    await sub.connect()
    await sub.subscribe("t/race", qos=1)  # races the service's restore of the same filter
    await sub.wait_for_deliveries(5, timeout=10)
    await h.settle()
    assert payloads(sub) == [f"r{i}".encode() for i in range(5)]
    assert h.emu is not None
    subscribed = [c for c in h.emu.calls_of("session.subscribed") if c.request.clientinfo.clientid == "eager"]
    assert len(subscribed) >= 3  # first subscribe, the restore and the client's own


async def test_overlapping_filters_replay_each_message_once(h: Harness) -> None:
    await publish_all(h, [("o/1", b"a"), ("o/2", b"b")])
    sub = h.client("overlap", auto_ack=False)
    await sub.connect()
    await sub.subscribe("o/#", qos=1)
    await sub.subscribe("o/+", qos=1)
    await h.settle()
    origins = [item["properties"]["user_properties"][REPLAY_PROPERTY]  # type: ignore[index]
               for item in h.bulk_items()]
    assert len(origins) == 2 and len(set(origins)) == 2
    sub.ack_all()
    await h.settle()
    assert await h.backend.count_messages() == 0


async def test_resumed_persistent_session_gets_no_duplicates(h: Harness) -> None:
    sub = h.client("persistent", clean_start=False, session_expiry=300)
    await sub.connect()
    await sub.subscribe("t/p", qos=1)
    await sub.disconnect()
    await h.settle()
    await publish_all(h, [("t/p", b"p1"), ("t/p", b"p2")])
    await sub.connect()  # the broker resumes the session and delivers its own queue
    await sub.wait_for_deliveries(2, timeout=10)
    await h.settle()
    assert payloads(sub) == [b"p1", b"p2"]
    assert h.bulk_items() == []
    assert h.emu is not None and h.emu.rest_bodies("/clients/persistent/subscribe/bulk") == []
    assert await h.backend.count_messages() == 0


async def test_a_replay_left_unacked_comes_again_on_the_next_connection(h: Harness) -> None:
    # EMQX 5.3 (v2 here) sends no peer port: both connections come from the same host and
    # port 0, so only the reset of the replay marks on connect lets the message come again
    sub = h.client("forgetful", auto_ack=False)
    await sub.connect()
    await sub.subscribe("t/u", qos=1)
    await sub.disconnect()
    await h.settle()
    await publish_all(h, [("t/u", b"not acked")])
    await sub.connect()
    await sub.wait_for_deliveries(1, timeout=10)
    await sub.drop()  # gone before its PUBACK
    await h.settle()
    assert await h.backend.count_messages() == 1
    sub.deliveries.clear()
    sub.auto_ack = True
    await sub.connect()
    await sub.wait_for_deliveries(1, timeout=10)
    await h.settle()
    assert payloads(sub) == [b"not acked"]
    assert await h.backend.count_messages() == 0
