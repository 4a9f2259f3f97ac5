"""/metrics as Prometheus scrapes it, while the end-to-end scenarios run: every
counter moves by exactly what the scenario did (every backend, both versions)."""

from __future__ import annotations

from collections.abc import Mapping

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.harness import Harness

# Backends whose store writes DropPendingReplay already (the integrator adds each as its
# branch lands; once all do, the condition goes).

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(h: Harness) -> Samples:
    assert h.service.http is not None
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{h.service.http.port}/metrics") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            text = await resp.text()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    key = ("offline_exhook_" + name, frozenset(labels.items()))
    assert key in after, f"{key} not exposed"
    return after[key] - before.get(key, 0.0)


def deltas(before: Samples, after: Samples, wanted: Mapping[str, float], **labels: str) -> dict[str, float]:
    return {name: delta(before, after, name, **labels) for name in wanted}


async def test_counters_follow_publish_replay_and_ack(h: Harness) -> None:
    before = await scrape(h)
    pub = h.client("metrics-pub")
    await pub.connect()
    for i in range(3):
        await pub.publish("t/m", f"m{i}".encode(), qos=1)
    await pub.publish("t/m", b"fire and forget", qos=0)
    await pub.publish("untracked/m", b"not ours", qos=1)  # the HookSpec filters keep it from the service
    await h.settle()
    stored = await scrape(h)
    assert delta(before, stored, "messages_stored_total") == 3
    assert delta(before, stored, "messages_skipped_total", reason="qos0") == 1
    assert delta(before, stored, "hook_calls_total", hook="message.publish") == 4
    assert delta(before, stored, "hook_calls_total", hook="client.connected") == 1
    assert delta(before, stored, "publish_duration_seconds_count") == 4
    assert delta(before, stored, "store_write_batch_size_sum") == 3

    sub = h.client("metrics-sub")
    await sub.connect()
    await sub.subscribe("t/m", qos=1)
    await sub.wait_for_deliveries(3, timeout=10)
    await h.settle()
    assert await h.backend.count_messages() == 0
    after = await scrape(h)
    # 3 deletes, and a re-key for each replay whose ack did not come while it was held
    # (held_rekeys.py); a v2 broker's replays are recognised in memory, and the
    # publish/bulk call drops their registry entries itself, outside the writer
    rekeyed = delta(stored, after, "messages_rekeyed_total")
    assert rekeyed + delta(stored, after, "rekeys_merged_total") == 3
    assert {
        "messages_replayed_total": delta(stored, after, "messages_replayed_total"),
        "messages_acked_total": delta(stored, after, "messages_acked_total"),
        "messages_deleted_total": delta(stored, after, "messages_deleted_total"),
        "replay": delta(stored, after, "messages_skipped_total", reason="replay"),
        "stored": delta(stored, after, "messages_stored_total"),
        "publish calls": delta(stored, after, "hook_calls_total", hook="message.publish"),
        "acked calls": delta(stored, after, "hook_calls_total", hook="message.acked"),
        "subscribed calls": delta(stored, after, "hook_calls_total", hook="session.subscribed"),
        "write ops": delta(stored, after, "store_write_batch_size_sum"),
        "failures": delta(stored, after, "replay_failures_total"),
    } == {
        "messages_replayed_total": 3, "messages_acked_total": 3, "messages_deleted_total": 3,
        "replay": 3, "stored": 0, "publish calls": 3, "acked calls": 3,
        "subscribed calls": 1, "write ops": rekeyed + 3, "failures": 0,
    }
    # every write was durable before the scrape: nothing is left buffered
    assert after[("offline_exhook_pending_writes", frozenset())] == 0
    assert after[("offline_exhook_backend_up", frozenset())] == 1


async def test_rest_errors_are_counted_by_status(make_harness) -> None:  # type: ignore[no-untyped-def]
    h: Harness = await make_harness(extra_hocon='exhook.emqx.api_secret = "not-the-secret"')
    before = await scrape(h)
    pub = h.client("p401")
    await pub.connect()
    await pub.publish("t/e", b"stored", qos=1)
    sub = h.client("s401")
    await sub.connect()
    await sub.subscribe("t/e", qos=1)
    await h.settle()
    after = await scrape(h)
    # a 401 is not retried: one call, one error, one failed replay, the message stays stored
    assert delta(before, after, "emqx_api_errors_total", endpoint="publish/bulk", status="401") == 1
    assert delta(before, after, "replay_failures_total") == 1
    assert delta(before, after, "messages_replayed_total") == 0
    assert sub.deliveries == []
    assert await h.backend.count_messages() == 1
