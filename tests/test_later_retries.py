"""Restores and replays an outage made fail are tried again later (exhook/later_retries.py
and its use in exhook/hooks.py): while the failure may pass, for as long as the client
has not connected again, without sending anything twice. The REST API here is the
recording stand-in of tests/test_hooks.py, made to fail; the store is the in-memory one.
No test waits for a clock: each waits (bounded) for what it expects."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from exhook import later_retries
from exhook.emqx_api import BulkResult, EmqxApiError, ReplayItem
from exhook.later_retries import LaterRetries
from storage.base import StoreError
from storage.model import Subscription
from storage.retry import Backoff
from tests.memory_store import MemoryStore
from tests.service_proc import eventually
from tests.test_hooks import Rig, client, guid, running_rig

QUICK = Backoff(base=0.01, cap=0.02)
BOUND_S = 20  # far beyond any wait here: a retry that never comes fails instead of hanging


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    async with running_rig(tmp_path, MemoryStore()) as rig:
        rig.logic.later = LaterRetries(QUICK, on_change=rig.metrics.jobs_retry_waiting.set)
        task = asyncio.create_task(rig.logic.later.run())
        try:
            yield rig
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def failing_publishes(rig: Rig, calls: int, error: EmqxApiError) -> list[int]:
    """The first ``calls`` publish/bulk calls fail with ``error``, publishing nothing."""
    publish = rig.api.publish_bulk
    failed = [0]

    async def flaky(items: list[ReplayItem]) -> BulkResult:
        if failed[0] < calls:
            failed[0] += 1
            raise error
        return await publish(items)

    rig.api.publish_bulk = flaky  # type: ignore[method-assign]
    return failed


async def until(check: object) -> None:
    await eventually(check, BOUND_S, "the retry", every=0.01)


async def test_a_replay_an_api_outage_made_fail_is_sent_later_once(rig: Rig) -> None:
    await rig.publish(1)
    await rig.publish(2)
    failed = failing_publishes(rig, 9, EmqxApiError("EMQX API unreachable"))  # beyond two rounds of 4 tries
    rig.logic.session_subscribed(client(peerport=1001), "t/a", 1)
    await until(lambda: [item.origin for item in rig.api.replayed] == [guid(1), guid(2)])
    await rig.settle()
    assert failed[0] == 9
    assert [item.origin for item in rig.api.replayed] == [guid(1), guid(2)]  # once each
    assert rig.metrics.sample("replay_failures_total") == 2  # two rounds of 4 tries given up, then sent
    assert rig.logic.later.waiting == 0 and rig.metrics.sample("client_jobs_retry_waiting") == 0


async def test_a_replay_refused_for_good_is_not_tried_again(rig: Rig) -> None:
    await rig.publish(1)
    failing_publishes(rig, 100, EmqxApiError("publish/bulk answered 413: too large", 413, retryable=False))
    rig.logic.session_subscribed(client(peerport=1001), "t/a", 1)
    await rig.settle()
    assert rig.metrics.sample("replay_failures_total") == 1
    assert rig.logic.later.waiting == 0


async def test_a_replay_tried_again_stops_once_the_client_connected_again(rig: Rig) -> None:
    await rig.publish(1)
    await rig.store.save_subscription("sub", "t/a", 1)
    rig.logic.later = LaterRetries(Backoff(base=3600.0, cap=3600.0))  # waits until the test runs it
    failing_publishes(rig, 4, EmqxApiError("EMQX API unreachable"))  # the first round only
    rig.logic.session_subscribed(client(peerport=1001), "t/a", 1)
    await rig.settle()
    assert rig.logic.later.waiting == 1 and rig.api.replayed == []
    rig.logic.client_connected(client(peerport=1002))  # a new connect: its own restore replays
    await rig.settle()
    assert [item.origin for item in rig.api.replayed] == [guid(1)]
    waiting = rig.logic.later
    for _, run in list(waiting._entries.values()):  # the retry comes due now
        run()
    await rig.settle()
    assert [item.origin for item in rig.api.replayed] == [guid(1)]  # not again


async def test_a_restore_an_api_outage_made_fail_is_tried_again(rig: Rig) -> None:
    await rig.publish(1)
    await rig.store.save_subscription("sub", "t/a", 1)
    subscribe = rig.api.subscribe_bulk
    failed = [0]

    async def flaky(clientid: str, subscriptions: list[tuple[str, int]]) -> bool:
        if failed[0] < 6:
            failed[0] += 1
            raise EmqxApiError("EMQX API unreachable")
        return await subscribe(clientid, subscriptions)

    rig.api.subscribe_bulk = flaky  # type: ignore[method-assign]
    rig.logic.client_connected(client(peerport=1001))
    await until(lambda: [item.origin for item in rig.api.replayed] == [guid(1)])
    await rig.settle()
    assert rig.api.subscribed == [("sub", [("t/a", 1)])]
    assert [item.origin for item in rig.api.replayed] == [guid(1)]
    assert rig.logic.later.waiting == 0


async def test_one_entry_per_key_and_the_oldest_dropped_beyond_the_bound() -> None:
    ran: list[str] = []
    dropped = [0]
    later = LaterRetries(Backoff(base=3600.0, cap=3600.0), max_waiting=2,
                         on_dropped=lambda: dropped.__setitem__(0, dropped[0] + 1))
    later.schedule("a", 1, "replay", lambda: ran.append("a"))
    later.schedule("a", 2, "replay", lambda: ran.append("a again"))  # already waiting: unchanged
    later.schedule("b", 1, "replay", lambda: ran.append("b"))
    later.schedule("c", 1, "replay", lambda: ran.append("c"))  # beyond 2: "a" goes
    assert later.waiting == 2 and dropped == [1]
    assert sorted(later._entries) == ["b", "c"]


@pytest.fixture
async def by_hand(tmp_path: Path) -> AsyncIterator[Rig]:
    """A rig whose retries come due only when the test runs them (``run_due``)."""
    async with running_rig(tmp_path, MemoryStore()) as rig:
        rig.logic.later = LaterRetries(Backoff(base=3600.0, cap=3600.0))
        yield rig


def run_due(rig: Rig) -> None:
    due = list(rig.logic.later._entries.values())
    rig.logic.later._entries.clear()
    for _, run in due:
        run()


async def test_a_replay_tried_again_sends_only_what_failed(by_hand: Rig) -> None:
    rig = by_hand
    await rig.publish(1)
    failing_publishes(rig, 4, EmqxApiError("EMQX API unreachable"))
    rig.logic.session_subscribed(client(peerport=1001), "t/a", 1)
    await rig.settle()
    assert rig.logic.later.waiting == 1
    await rig.publish(2)  # the client is subscribed now: the broker routed this one to it live
    run_due(rig)
    await rig.settle()
    assert [item.origin for item in rig.api.replayed] == [guid(1)]


async def test_a_replay_is_not_tried_again_for_a_filter_dropped_since(by_hand: Rig) -> None:
    rig = by_hand
    await rig.publish(1)
    await rig.publish(2)
    failing_publishes(rig, 4, EmqxApiError("EMQX API unreachable"))
    rig.logic.session_subscribed(client(peerport=1001), "t/a", 1)
    await rig.settle()
    rig.logic.session_unsubscribed(client(peerport=1001), "t/a")
    await rig.settle()
    run_due(rig)
    await rig.settle()
    assert rig.api.replayed == []
    rig.logic.session_subscribed(client(peerport=1001), "t/a", 1)  # again: it gets what it missed
    await rig.settle()
    assert [item.origin for item in rig.api.replayed] == [guid(1), guid(2)]


async def test_a_restore_tried_again_after_a_resume_restores_the_resumed_connection_once(by_hand: Rig) -> None:
    rig = by_hand
    await rig.publish(1)
    await rig.publish(2)
    await rig.store.save_subscription("sub", "t/a", 1)
    subscribe = rig.api.subscribe_bulk
    failed = [0]

    async def flaky(clientid: str, subscriptions: list[tuple[str, int]]) -> bool:
        if failed[0] < 4:  # the restore's own tries
            failed[0] += 1
            raise EmqxApiError("EMQX API unreachable")
        return await subscribe(clientid, subscriptions)

    rig.api.subscribe_bulk = flaky  # type: ignore[method-assign]
    rig.logic.client_connected(client(peerport=1001))  # its session.created was lost
    await rig.settle()
    assert rig.logic.later.waiting == 1
    rig.logic.session_resumed(client(peerport=1002))  # back with clean_start=false: that same session
    rig.logic.client_connected(client(peerport=1002))
    await rig.settle()
    rig.broker_calls_session_subscribed(0.0, peerport=1002)  # the broker's calls carry the new key
    run_due(rig)
    await rig.settle()
    await asyncio.sleep(0.1)  # the broker's session.subscribed calls (call_later)
    await rig.settle()
    assert rig.api.subscribed == [("sub", [("t/a", 1)])]
    assert [item.origin for item in rig.api.replayed] == [guid(1), guid(2)]


async def test_tries_end_after_about_an_hour_of_failures() -> None:
    dropped = [0]
    later = LaterRetries(Backoff(base=3600.0, cap=3600.0), on_dropped=lambda: dropped.__setitem__(0, dropped[0] + 1))
    later.schedule("a", later_retries.MAX_FAILURES, "replay", lambda: None)
    later.schedule("b", later_retries.MAX_FAILURES + 1, "replay", lambda: None)
    assert sorted(later._entries) == ["a"] and dropped == [1]


class FailingReads(MemoryStore):
    """A store whose reads of subscriptions fail the first ``fails`` times."""

    def __init__(self, fails: int) -> None:
        super().__init__()
        self.fails = fails

    async def subscriptions(self, clientid: str) -> list[Subscription]:
        if self.fails > 0:
            self.fails -= 1
            raise StoreError("memory: store unreachable")
        return await super().subscriptions(clientid)


async def connect_while_the_store_fails(rig: Rig, peerport: int = 1001) -> None:
    """A stored message on t/a, a client with that stored subscription connects, and its
    restore fails (the store's first calls fail); retries run only by hand (run_due)."""
    rig.logic.later = LaterRetries(Backoff(base=3600.0, cap=3600.0))
    await rig.publish(1)
    await rig.store.save_subscription("sub", "t/a", 1)
    rig.logic.client_connected(client(peerport=peerport))
    await rig.settle()


async def test_a_restore_whose_read_failed_resets_the_marks_once(tmp_path: Path) -> None:
    """The restore's first store call reads the subscriptions and resets the marks: when
    the read fails, the marks are not reset yet, so the restore tried again resets them
    (once) without undoing what the client's own subscribe replayed meanwhile."""
    store = FailingReads(4)  # the restore's own tries
    async with running_rig(tmp_path, store) as rig:
        await connect_while_the_store_fails(rig)
        assert rig.logic.later.waiting == 1
        rig.logic.session_subscribed(client(peerport=1001), "t/a", 1)  # the client's own subscribe
        await rig.settle()
        assert [item.origin for item in rig.api.replayed] == [guid(1)]
        run_due(rig)
        await rig.settle()
        assert [item.origin for item in rig.api.replayed] == [guid(1)]
        assert store.calls.count("reset_replay_marks") == 1


class FailingResets(FailingReads):
    """Also the first ``reset_fails`` resets of replay marks fail."""

    def __init__(self, fails: int, reset_fails: int) -> None:
        super().__init__(fails)
        self.reset_fails = reset_fails

    async def reset_replay_marks(self, connection: str) -> None:
        if self.reset_fails > 0:
            self.reset_fails -= 1
            raise StoreError("memory: store unreachable")
        await super().reset_replay_marks(connection)


async def test_a_replay_whose_owed_reset_failed_is_tried_again(tmp_path: Path) -> None:
    """The restore failed before its reset; the client's own subscribe then owes the
    reset, and that fails too: the replay is tried again later, like any failed replay,
    and the message arrives once."""
    store = FailingResets(4, 4)
    async with running_rig(tmp_path, store) as rig:
        await connect_while_the_store_fails(rig)
        rig.logic.session_subscribed(client(peerport=1001), "t/a", 1)
        await rig.settle()
        assert rig.api.replayed == []
        assert {key[0] for key in rig.logic.later._entries} == {"restore", "replay"}
        assert rig.metrics.sample("replay_failures_total") == 1
        run_due(rig)
        await rig.settle()
        assert [item.origin for item in rig.api.replayed] == [guid(1)]


async def test_a_new_connect_forgets_what_an_earlier_one_with_the_same_key_owed(tmp_path: Path) -> None:
    """EMQX 5.3 (no peer port): a connect whose restore failed before its reset leaves
    the reset owed under the key; the next connect with that key resets in its own
    restore, and its replays must not reset again (undoing the restore's claims)."""
    store = FailingReads(4)
    async with running_rig(tmp_path, store) as rig:
        await connect_while_the_store_fails(rig, peerport=0)
        assert rig.logic._unreset.get(client().connection) is not None
        rig.logic.session_created(client())  # connect 2, a fresh session, the same key
        rig.logic.client_connected(client())
        await rig.settle()
        assert rig.logic._unreset.get(client().connection) is None
        assert [item.origin for item in rig.api.replayed] == [guid(1)]
        assert store.calls.count("reset_replay_marks") == 1
