"""Replays and restores that meet a failure: an early stop, a stored message or
subscription EMQX refuses, a publish/bulk that fails its whole retry budget, items
EMQX did not dispatch. The REST API here answers as EMQX does (tests/emulator/rest.py:
one bad item refuses the whole array with 400; per-item bodies otherwise)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import pytest

import exhook.retry
from exhook.emqx_api import NO_MATCHING_SUBSCRIBERS, BulkResult, EmqxApi, EmqxApiError, ReplayItem, bulk_result
from exhook.metrics import Metrics
from exhook.replay import BrokerFlags, Replayed, Replayer
from exhook.topics import TopicSet
from exhook.validate import topic_problem
from storage.model import SaveMessage, StoredMessage
from storage.retry import Backoff
from tests.memory_store import MemoryStore
from tests.test_hooks import client, guid, running_rig

CONN = "sub@10.0.0.7:0"


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same retry policy, with pauses of a millisecond (the service: 0.25-2 s)."""
    fast = replace(exhook.retry.BACKGROUND, backoff=Backoff(base=0.001, cap=0.002))
    monkeypatch.setattr(exhook.retry, "BACKGROUND", fast)


@dataclass
class EmqxLikeApi:
    """publish/bulk and subscribe(/bulk) answered as EMQX answers them."""

    calls: list[list[ReplayItem]] = field(default_factory=list)  # every publish/bulk
    published: list[list[ReplayItem]] = field(default_factory=list)  # those EMQX published
    refused_payloads: set[bytes] = field(default_factory=set)  # 400 for an item EMQX refuses
    undispatched: set[bytes] = field(default_factory=set)  # answered failed_to_dispatch
    unmatched: set[bytes] = field(default_factory=set)  # answered no_matching_subscribers
    failing_calls: int = 0  # calls answered 503 as a whole (a proxy, an overloaded broker)...
    failing_after: int = 0  # ...once this many calls were answered
    subscribe_bulk_calls: list[list[tuple[str, int]]] = field(default_factory=list)
    subscribe_calls: list[tuple[str, int]] = field(default_factory=list)
    refused_filters: set[str] = field(default_factory=set)

    async def publish_bulk(self, items: list[ReplayItem]) -> BulkResult:
        self.calls.append(items)
        await asyncio.sleep(0.001)  # a round trip: the read-ahead fills its queue meanwhile
        if self.failing_calls > 0 and len(self.calls) > self.failing_after:
            self.failing_calls -= 1
            raise EmqxApiError("publish/bulk answered 503: overloaded", 503)
        if any(not self._valid(item) for item in items):  # nothing of the array is published
            raise EmqxApiError("publish/bulk answered 400: {'reason_code': 144}", 400, retryable=False)
        self.published.append(items)
        answers = [self._answer(item) for item in items]
        status = 200 if all("id" in a for a in answers) else 202
        return bulk_result(status, answers, len(items))

    def _valid(self, item: ReplayItem) -> bool:
        return item.qos in (0, 1, 2) and topic_problem(item.topic) is None and item.payload not in self.refused_payloads

    def _answer(self, item: ReplayItem) -> dict[str, Any]:
        if item.payload in self.undispatched:
            return {"reason_code": 131, "message": "failed_to_dispatch"}
        if item.payload in self.unmatched:
            return {"reason_code": NO_MATCHING_SUBSCRIBERS, "message": "no_matching_subscribers"}
        return {"id": "F" * 32}

    async def subscribe_bulk(self, clientid: str, subscriptions: list[tuple[str, int]]) -> bool:
        self.subscribe_bulk_calls.append(subscriptions)
        if any(not self._valid_sub(t, q) for t, q in subscriptions):
            raise EmqxApiError("subscribe/bulk answered 400: qos", 400, retryable=False)
        return True

    async def subscribe(self, clientid: str, topic: str, qos: int) -> bool:
        self.subscribe_calls.append((topic, qos))
        if not self._valid_sub(topic, qos):
            raise EmqxApiError("subscribe answered 400: qos", 400, retryable=False)
        return True

    def _valid_sub(self, topic: str, qos: int) -> bool:
        return qos in (0, 1, 2) and topic not in self.refused_filters

    @property
    def payloads(self) -> list[bytes]:
        return [item.payload for call in self.published for item in call]


class Setup:
    def __init__(self, batch_size: int = 3, page_size: int = 3) -> None:
        self.store = MemoryStore()
        self.api = EmqxLikeApi()
        self.metrics = Metrics()
        self.replayer = Replayer(self.store, cast(EmqxApi, self.api), self.metrics, TopicSet(("t/#",)),
                                 BrokerFlags(), batch_size=batch_size, page_size=page_size)

    async def stored(self, *payloads: bytes, topic: str = "t/a", qos: int = 1) -> None:
        for payload in payloads:
            i = len(self.store.messages) + 1
            await self.store.write([SaveMessage(StoredMessage(guid(i), "pub", topic, qos, False, payload, i))])

    def skipped(self, reason: str, what: str = "replay_messages") -> float:
        return self.metrics.sample(f"{what}_skipped_total", reason=reason)


def payloads(n: int) -> list[bytes]:
    return [f"m{i}".encode() for i in range(1, n + 1)]


def leftover_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]


# -- 1. an early stop ends the read-ahead ------------------------------------------


@pytest.mark.parametrize("stop", ["client connected again", "publish failed"])
async def test_a_replay_that_stops_early_leaves_no_task_behind(stop: str) -> None:
    # two batches a page: the second goes out with the read-ahead blocked on a full queue
    s = Setup(batch_size=1, page_size=2)
    await s.stored(*payloads(20))
    if stop == "publish failed":
        s.api.failing_calls = 100
        current = lambda: True  # noqa: E731
    else:
        checks = iter(range(100))
        current = lambda: next(checks) < 3  # noqa: E731  (stops before the fourth batch)
    async with asyncio.timeout(5):
        await s.replayer.replay("sub", CONN, "t/a", current=current)
    # at once: the read-ahead is ended before the replay returns, not whenever the
    # garbage collector closes the generator (in a task of its own)
    assert leftover_tasks() == []


# -- 2. what EMQX refuses is skipped, the rest delivered ---------------------------


async def test_a_stored_message_emqx_cannot_take_is_skipped_on_read(caplog: pytest.LogCaptureFixture) -> None:
    s = Setup()
    await s.stored(b"m1")
    await s.stored(b"qos3", qos=3)  # another writer of the store (Redis keeps qos as text)
    await s.stored(b"m3")
    await s.stored(b"bad-topic", topic="t/a+b")
    replayed = await s.replayer.replay("sub", CONN, "t/#")
    # one call, without the bad ones: no 400, no search for the culprit
    assert [[item.payload for item in call] for call in s.api.published] == [[b"m1", b"m3"]]
    assert (replayed.published, replayed.delivered, replayed.failed) == (2, 2, False)
    assert s.skipped("bad_qos") == 1 and s.skipped("bad_topic") == 1
    await s.store.reset_replay_marks(CONN)
    await s.replayer.replay("sub", CONN, "t/#")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stored message not replayable")]
    assert lines == ["stored message not replayable (bad_qos): skipped",
                     "stored message not replayable (bad_topic): skipped"]  # once each, not per replay


async def test_a_batch_emqx_refuses_with_400_is_split_and_the_rest_delivered() -> None:
    s = Setup(batch_size=5, page_size=5)
    await s.stored(*payloads(7))
    s.api.refused_payloads = {b"m3"}  # a 400 nothing here foresees (e.g. too large for the broker)
    replayed = await s.replayer.replay("sub", CONN, "t/a")
    assert s.api.payloads == [p for p in payloads(7) if p != b"m3"]  # each once, in order
    assert len(s.api.calls) == 6  # [m1-m5] [m1 m2] [m3-m5] [m3] [m4 m5], then [m6 m7]
    assert (replayed.published, replayed.delivered, replayed.failed) == (7, 6, False)
    assert s.skipped("rejected") == 1
    assert s.metrics.sample("messages_replayed_total") == 6
    assert s.metrics.sample("replay_failures_total") == 0


async def test_a_failing_filter_does_not_stop_the_restore_of_the_others(tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    class BrokenTopicStore(MemoryStore):
        def read_messages(self, ranges: dict[str, tuple[float | None, float]],
                          page_size: int) -> AsyncIterator[list[StoredMessage]]:
            if "t/a" in ranges:
                raise RuntimeError("cannot decode a row of t/a")
            return super().read_messages(ranges, page_size)

    async with running_rig(tmp_path, BrokenTopicStore()) as rig:
        await rig.publish(1, topic="t/a")
        await rig.publish(2, topic="t/b")
        await rig.store.save_subscription("sub", "t/a", 1)
        await rig.store.save_subscription("sub", "t/b", 1)
        rig.logic.client_connected(client())
        await rig.settle()
        assert [item.origin for item in rig.api.replayed] == [guid(2)]
        assert rig.metrics.sample("replay_failures_total") == 1
        failed = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert failed == ["replay failed: RuntimeError: cannot decode a row of t/a"]


# -- 3. a failed delivery gives its claim back; only routed items count as delivered ---


async def test_a_publish_that_fails_its_retries_gives_the_range_back() -> None:
    s = Setup(batch_size=2, page_size=2)
    await s.stored(*payloads(5))
    s.api.failing_after, s.api.failing_calls = 1, 4  # the first batch goes out, the second fails all tries
    replayed = await s.replayer.replay("sub", CONN, "t/a")
    assert replayed.failed and replayed.delivered == 2
    assert s.metrics.sample("replay_failures_total") == 1
    # the broker's next session.subscribed of this connection replays what was not delivered, once
    s.api.published.clear()
    again = await s.replayer.replay("sub", CONN, "t/a")
    assert s.api.payloads == [b"m3", b"m4", b"m5"]
    assert (again.published, again.delivered, again.failed) == (3, 3, False)
    s.api.published.clear()
    assert await s.replayer.replay("sub", CONN, "t/a") == Replayed(0, 0)
    assert s.api.published == []


async def test_items_emqx_did_not_dispatch_are_not_counted_as_delivered() -> None:
    s = Setup()
    await s.stored(b"m1", b"m2", b"m3")
    s.api.undispatched = {b"m2"}
    replayed = await s.replayer.replay("sub", CONN, "t/a")
    assert (replayed.published, replayed.delivered) == (3, 2)
    assert s.metrics.sample("messages_replayed_total") == 2
    assert s.skipped("not_dispatched") == 1
    assert guid(2) in s.store.messages  # stays stored: replayed at the next connection


async def test_a_replay_that_delivered_some_and_then_reached_nobody_is_not_sent_again() -> None:
    # the client left mid-replay: what went out is not published again (to nobody) try
    # after try; its next connect replays the rest
    s = Setup(batch_size=2, page_size=2)
    await s.stored(*payloads(6))
    s.api.unmatched = {b"m3", b"m4", b"m5", b"m6"}
    settled: list[object] = []

    async def settle(topics: object) -> None:
        settled.append(topics)

    replayed = await s.replayer.replay("sub", CONN, "t/a", settle=settle)
    assert [[item.payload for item in call] for call in s.api.calls] == [[b"m1", b"m2"], [b"m3", b"m4"]]
    assert settled == []
    assert (replayed.published, replayed.delivered, replayed.reached_nobody) == (4, 2, True)


async def test_an_error_of_one_filter_other_than_a_refused_key_does_not_end_the_restore(
        tmp_path: Path) -> None:
    # a 413 (a batch beyond a proxy's body limit) fails that filter's replay only
    s = Setup()
    await s.stored(b"big", topic="t/a")
    await s.stored(b"m2", topic="t/b")
    for topic in ("t/a", "t/b"):
        s.store.subs.setdefault("sub", {})[topic] = 1
    bulk = s.api.publish_bulk

    async def too_large_for_t_a(items: list[ReplayItem]) -> BulkResult:
        if items[0].topic == "t/a":
            raise EmqxApiError("publish/bulk answered 413: too large", 413, retryable=False)
        return await bulk(items)

    s.api.publish_bulk = too_large_for_t_a  # type: ignore[method-assign]
    await s.replayer.restore("sub")
    failed = await s.replayer.replay("sub", CONN, "t/a")
    delivered = await s.replayer.replay("sub", CONN, "t/b")
    assert failed.failed and not delivered.failed
    assert s.api.payloads == [b"m2"]
    assert s.metrics.sample("replay_failures_total") == 1


def test_publish_bulk_answers_are_sorted_by_what_emqx_said() -> None:
    answers = [{"id": "A" * 32}, {"reason_code": 16, "message": "no_matching_subscribers"},
               {"reason_code": 131, "message": "failed_to_dispatch"}, "garbage"]
    assert bulk_result(503, answers, 5) == BulkResult(503, 1, 1, 3)  # the fifth had no answer at all


# -- 4. one bad stored subscription does not cost the client the others -----------


async def test_stored_subscriptions_emqx_cannot_take_are_left_out(caplog: pytest.LogCaptureFixture) -> None:
    s = Setup()
    for topic, qos in (("t/a", 1), ("t/b", 3), ("t/#/x", 1), ("t/c", 2)):
        s.store.subs.setdefault("sub", {})[topic] = qos
    restored = await s.replayer.restore("sub")
    assert s.api.subscribe_bulk_calls == [[("t/a", 1), ("t/c", 2)]]
    assert restored == [("t/a", 1), ("t/c", 2)]
    assert s.skipped("bad_qos", "restore_subscriptions") == 1
    assert s.skipped("bad_filter", "restore_subscriptions") == 1
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR] == [
        "stored subscription not restored (bad_filter)", "stored subscription not restored (bad_qos)"]


async def test_a_subscribe_bulk_refused_with_400_falls_back_to_one_by_one() -> None:
    s = Setup()
    for topic in ("t/a", "t/b", "t/c"):
        s.store.subs.setdefault("sub", {})[topic] = 1
    s.api.refused_filters = {"t/b"}  # refused for a reason the checks here do not foresee
    restored = await s.replayer.restore("sub")
    assert restored == [("t/a", 1), ("t/c", 1)]
    assert s.api.subscribe_calls == [("t/a", 1), ("t/b", 1), ("t/c", 1)]
    assert s.skipped("rejected", "restore_subscriptions") == 1
