"""HookLogic and Replayer over an in-memory store (issue 12 item 5): the guarantees of
the hook paths, fast and without a server. The REST API is a recorder standing in
for EMQX: what the broker would do with the calls is the emulator's business
(tests/e2e); here it is what the service asks of it."""

from __future__ import annotations

import asyncio
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import pytest

from exhook import hooks, replay
from exhook.client_queue import ClientQueues
from exhook.emqx_api import BulkResult, EmqxApi, EmqxApiError, ReplayItem
from exhook.expiring import ExpiringMap
from exhook.hooks import HTTP_API, ClientRef, HookLogic
from exhook.metrics import Metrics
from exhook.pacing import AdaptiveLimit
from exhook.replay import UNTIL_SUBSCRIBED, BrokerFlags, LocalReplays, Replayer, payload_digest
from exhook.spool import Spool
from exhook.subscribed_calls import SubscribedCalls
from exhook.topics import TopicSet
from exhook.writer import Entry, OrderedWriter, WriterSettings
from storage.base import StoreError
from storage.model import DropPendingReplay, PendingReplay, WriteOp
from storage.retry import Backoff
from tests.memory_store import MemoryStore
from tests.test_client_queue import HandFed

TRACKED = ("t/#", "w/+/x")
# how long a restore waits for session.subscribed calls the recorder never makes (the service: 2 s)
SUBSCRIBED_WAIT_S = 0.05
# a restore's replay that reached nobody is tried 3 times in all (the service: 14, over ~7 s)
QUICK_PATIENCE = replace(UNTIL_SUBSCRIBED, backoff=Backoff(base=0.001, cap=0.002), attempts=3)


def guid(i: int) -> str:
    return f"{i:032X}"


@dataclass
class RecordingApi:
    """Stands in for EMQX's REST API: records publish/bulk and subscribe/bulk."""

    published: list[list[ReplayItem]] = field(default_factory=list)
    subscribed: list[tuple[str, list[tuple[str, int]]]] = field(default_factory=list)
    # publish/bulk calls that reach no subscriber (the broker applies a REST
    # subscription only once the client's process is out of the hook it is in)
    unrouted: int = 0
    # calls after this many reach nobody (the client left); None: no such end
    routed_calls: int | None = None
    # EMQX's message.publish of each item, run one after the other before the call
    # answers (None: the test plays no hook calls)
    hook: Callable[[ReplayItem], Awaitable[None]] | None = None
    # hook calls the broker gives up on (timeout, CANCELLED) and carries on without
    lost_hooks: int = 0
    # calls that fail (a 502 of a proxy) after the broker has published the items
    fail_after_publishing: int = 0
    # what the broker does once it has applied a subscribe/bulk: its session.subscribed
    # calls (None: the test plays none, as if each were lost)
    on_subscribed: Callable[[str, list[tuple[str, int]]], None] | None = None
    # the order of the calls: ("publish", topic) and ("subscribed", topic)
    events: list[tuple[str, str]] = field(default_factory=list)

    async def publish_bulk(self, items: list[ReplayItem]) -> BulkResult:
        self.published.append(items)
        self.events += [("publish", item.topic) for item in items]
        await self._run_hooks(items)
        if self.fail_after_publishing > 0:
            self.fail_after_publishing -= 1
            raise EmqxApiError("publish/bulk answered 502: bad gateway", 502)
        if self.unrouted > 0 or (self.routed_calls is not None and len(self.published) > self.routed_calls):
            self.unrouted = max(0, self.unrouted - 1)
            return BulkResult(200, 0, len(items))
        return BulkResult(200, len(items), 0)

    async def subscribe_bulk(self, clientid: str, subscriptions: list[tuple[str, int]]) -> bool:
        self.subscribed.append((clientid, subscriptions))
        if self.on_subscribed is not None:
            self.on_subscribed(clientid, subscriptions)
        return True

    async def _run_hooks(self, items: list[ReplayItem]) -> None:
        for item in items:
            if self.hook is None:
                return
            if self.lost_hooks > 0:
                self.lost_hooks -= 1
                continue
            await self.hook(item)

    @property
    def replayed(self) -> list[ReplayItem]:
        return [item for batch in self.published for item in batch]


class Rig:
    def __init__(self, store: MemoryStore, spool: Spool, v2: bool = False) -> None:
        self.store = store
        self.api = RecordingApi()
        self.metrics = Metrics()
        self.flags = BrokerFlags()
        self.flags.v2_seen = v2
        self.writer = OrderedWriter(store, spool, self.metrics, WriterSettings(100, 1000, 1 << 20))
        self.queues = ClientQueues(self.metrics)
        tracked = TopicSet(TRACKED)
        self.replayer = Replayer(store, cast(EmqxApi, self.api), self.metrics, tracked, self.flags, batch_size=3,
                                 until_subscribed=QUICK_PATIENCE)
        self.logic = HookLogic(tracked, store, self.writer, self.replayer, self.queues, self.metrics, self.flags,
                               publish_deadline_ms=500, rekey_hold_s=60, subscribed_wait_s=SUBSCRIBED_WAIT_S)
        self._broker_ids = 10_000

    def broker_runs_replay_hooks(self) -> None:
        """The REST API runs message.publish for each replayed item, as EMQX does: a
        v2 broker passes no replay property (from = http_api, a new id)."""
        async def hook(item: ReplayItem) -> None:
            self._broker_ids += 1
            await self.publish(self._broker_ids, topic=item.topic, qos=item.qos, sender=HTTP_API,
                               payload=item.payload, replay_of=None if self.flags.v2_seen else item.origin)
        self.api.hook = hook

    def broker_calls_session_subscribed(self, after_s: float, peerport: int = 0) -> None:
        """The broker applies a subscribe/bulk ``after_s`` after answering it (the
        client's process gets to it) and fires session.subscribed for each filter."""
        def fire(clientid: str, topic: str, qos: int) -> None:
            self.api.events.append(("subscribed", topic))
            self.logic.session_subscribed(client(clientid, peerport), topic, qos)

        def applied(clientid: str, subscriptions: list[tuple[str, int]]) -> None:
            loop = asyncio.get_running_loop()
            for topic, qos in subscriptions:
                loop.call_later(after_s, fire, clientid, topic, qos)
        self.api.on_subscribed = applied

    async def publish(self, i: int, topic: str = "t/a", qos: int = 1, sender: str = "pub",
                      payload: bytes | None = None, replay_of: str | None = None) -> None:
        await self.logic.message_publish(guid(i), sender, topic, qos, payload or f"m{i}".encode(), 1000 + i,
                                         replay_of, from_rest=sender == HTTP_API)

    async def restore_subscribed(self) -> None:
        """Wait (at most half a second) until a restore has called subscribe/bulk."""
        for _ in range(50):
            if self.api.subscribed:
                return
            await asyncio.sleep(0.01)

    async def settle(self) -> None:
        await self.queues.idle()
        self.logic.held_rekeys.flush()
        await self.writer.drained()


@asynccontextmanager
async def running_rig(tmp_path: Path, store: MemoryStore, v2: bool = False) -> AsyncIterator[Rig]:
    """A rig over ``store`` with its writer running; stopped (queues, writer, spool) on exit."""
    spool = Spool(tmp_path / "spool")
    await spool.open()
    rig = Rig(store, spool, v2)
    task = asyncio.create_task(rig.writer.run())
    try:
        yield rig
    finally:
        await rig.queues.close(1)
        await rig.writer.close(1)
        await asyncio.gather(task, return_exceptions=True)
        await spool.close()


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    async with running_rig(tmp_path, MemoryStore()) as rig:
        yield rig


def client(clientid: str = "sub", peerport: int = 0) -> ClientRef:
    # peerport 0: EMQX 5.3 sends none, so every connection of a client from one host looks alike
    return ClientRef(clientid, "emqx@127.0.0.1", "10.0.0.7", peerport)


async def test_a_tracked_qos1_publish_is_stored_before_the_answer(rig: Rig) -> None:
    await rig.publish(1)
    assert [m.msgid for m in rig.store.stored()] == [guid(1)]  # no settle: stored when answered
    assert rig.store.stored()[0].payload == b"m1"
    await rig.publish(2, qos=0)
    await rig.publish(3, topic="other/a")
    await rig.publish(4, topic="$SYS/x")
    assert [m.msgid for m in rig.store.stored()] == [guid(1)]
    assert rig.metrics.sample("messages_stored_total") == 1
    for reason in ("qos0", "untracked", "sys"):
        assert rig.metrics.sample("messages_skipped_total", reason=reason) == 1


async def test_a_wildcard_replay_covers_every_matching_topic_in_position_order(rig: Rig) -> None:
    order = [("t/b", 1), ("t/a", 2), ("w/1/x", 3), ("t/b/c", 4), ("t/a", 5), ("w/2/y", 6), ("t/b", 7)]
    for topic, i in order:
        await rig.publish(i, topic=topic)
    rig.logic.session_subscribed(client(), "t/#", 1)
    await rig.settle()
    assert [item.origin for item in rig.api.replayed] == [guid(i) for t, i in order if t.startswith("t/")]
    assert [len(batch) for batch in rig.api.published] == [3, 2]  # replay_batch_size 3
    rig.logic.session_subscribed(client(), "$share/g/w/+/x", 1)
    await rig.settle()
    assert rig.api.replayed[-1].origin == guid(3)


async def test_a_second_subscribe_in_one_connection_replays_nothing_twice(rig: Rig) -> None:
    await rig.publish(1)
    rig.logic.session_subscribed(client(), "t/a", 1)
    rig.logic.session_subscribed(client(), "t/#", 1)  # the client's own SUBSCRIBE racing our restore
    await rig.settle()
    assert [item.origin for item in rig.api.replayed] == [guid(1)]


async def test_a_reconnect_resets_the_marks_so_the_unacked_message_is_replayed_again(rig: Rig) -> None:
    await rig.publish(1)
    await rig.store.save_subscription("sub", "t/a", 1)
    rig.logic.client_connected(client())
    rig.logic.session_subscribed(client(), "t/a", 1)
    await rig.settle()
    assert [item.origin for item in rig.api.replayed] == [guid(1)]
    # the subscriber went away before acking; it reconnects from the same host (same
    # connection key without a peer port): the message must come again
    rig.logic.client_connected(client())
    rig.logic.session_subscribed(client(), "t/a", 1)
    await rig.settle()
    assert [item.origin for item in rig.api.replayed] == [guid(1), guid(1)]
    assert rig.api.subscribed == [("sub", [("t/a", 1)]), ("sub", [("t/a", 1)])]


async def test_a_resumed_session_is_not_restored(rig: Rig) -> None:
    await rig.store.save_subscription("sub", "t/a", 1)
    rig.logic.session_resumed(client())
    rig.logic.client_connected(client())
    await rig.settle()
    assert rig.api.subscribed == []
    assert "subscriptions" not in rig.store.calls
    rig.logic.client_connected(client())  # the next connect without a resumed session is restored
    await rig.settle()
    assert rig.api.subscribed == [("sub", [("t/a", 1)])]


async def test_a_replay_is_rekeyed_to_its_new_id_so_the_subscribers_ack_deletes_it(rig: Rig) -> None:
    await rig.publish(1, payload=b"hello")
    # v3: the replay comes back through message.publish with our user property
    await rig.publish(900, sender=HTTP_API, payload=b"hello", replay_of=guid(1))
    await rig.settle()
    assert [m.msgid for m in rig.store.stored()] == [guid(900)]
    assert rig.metrics.sample("messages_skipped_total", reason="replay") == 1
    rig.logic.message_acked(guid(900), "t/a", from_rest=True)
    await rig.settle()
    assert rig.store.stored() == []


async def test_an_ack_while_the_rekey_is_held_deletes_the_stored_id_in_one_write(rig: Rig) -> None:
    await rig.publish(1, payload=b"hello")
    await rig.publish(900, sender=HTTP_API, payload=b"hello", replay_of=guid(1))
    await rig.queues.idle()
    await rig.writer.drained()
    writes = rig.store.calls.count("write")
    assert [m.msgid for m in rig.store.stored()] == [guid(1)]  # the re-key is held back
    rig.logic.message_acked(guid(900), "t/a", subscriber="sub", from_rest=True)
    await rig.settle()
    assert rig.store.stored() == [] and rig.store.tombstones == set()
    assert rig.store.calls.count("write") == writes + 1  # the delete alone
    assert rig.metrics.sample("rekeys_merged_total") == 1
    assert rig.metrics.sample("messages_rekeyed_total") == 0


async def test_an_ack_of_an_earlier_replay_of_a_message_consumes_it_too(rig: Rig) -> None:
    await rig.publish(1)
    await rig.publish(900, sender=HTTP_API, replay_of=guid(1))  # to a connection that went away
    await rig.publish(901, sender=HTTP_API, replay_of=guid(1))  # replayed again, to the new one
    rig.logic.message_acked(guid(900), "t/a", from_rest=True)
    await rig.settle()
    assert rig.store.stored() == []
    rig.logic.message_acked(guid(901), "t/a", from_rest=True)  # its re-key was taken back: a plain replay ack
    await rig.settle()
    assert rig.store.stored() == [] and rig.store.tombstones == {guid(901)}


async def test_an_ack_at_another_instance_still_deletes_a_held_replay(rig: Rig, tmp_path: Path) -> None:
    other_spool = Spool(tmp_path / "other-spool")
    await other_spool.open()
    other = Rig(rig.store, other_spool)  # a second instance on the same store
    task = asyncio.create_task(other.writer.run())
    try:
        await rig.publish(1)
        await rig.publish(900, sender=HTTP_API, replay_of=guid(1))  # held here
        other.logic.message_acked(guid(900), "t/a", from_rest=True)  # the subscriber's channel goes there
        await other.settle()
        assert guid(900) in rig.store.tombstones
        await rig.settle()  # the hold ends: the late re-key meets the tombstone
        assert rig.store.stored() == []
        assert rig.metrics.sample("rekeys_merged_total") == 0
    finally:
        await other.writer.close(1)
        await asyncio.gather(task, return_exceptions=True)
        await other_spool.close()


async def test_the_ack_of_a_replay_leaves_a_tombstone_that_a_late_rekey_honours(rig: Rig) -> None:
    await rig.publish(1)
    rig.logic.message_acked(guid(900), "t/a", from_rest=True)  # the ack arrives before the re-key is written
    await rig.settle()
    assert guid(900) in rig.store.tombstones
    await rig.publish(900, sender=HTTP_API, replay_of=guid(1))
    await rig.settle()
    assert rig.store.stored() == []  # moved to the acked id, and so deleted


async def test_a_plain_ack_writes_no_tombstone(rig: Rig) -> None:
    await rig.publish(1)
    rig.logic.message_acked(guid(1), "t/a", from_rest=False)
    await rig.settle()
    assert rig.store.stored() == [] and rig.store.tombstones == set()


@pytest.fixture
async def v2rig(tmp_path: Path) -> AsyncIterator[Rig]:
    """A rig playing a v2 broker whose REST API runs message.publish for each replay."""
    async with running_rig(tmp_path, MemoryStore(), v2=True) as rig:
        rig.broker_runs_replay_hooks()
        yield rig


async def test_v2_replays_this_process_published_are_recognised_without_a_store_round_trip(v2rig: Rig) -> None:
    rig = v2rig
    await rig.publish(1, payload=b"same")
    rig.logic.session_subscribed(client(), "t/a", 1)
    await rig.settle()
    assert "register_pending_replays" in rig.store.calls
    assert "take_pending_replay" not in rig.store.calls  # v2 hid the property: recognised in memory
    assert [m.msgid for m in rig.store.stored()] == [guid(10_001)]  # re-keyed, not stored again
    assert not rig.store.pending[("t/a", payload_digest(b"same"))]  # the registry entry is gone too
    # a REST publish that is not ours is stored as usual
    await rig.publish(901, sender=HTTP_API, payload=b"other")
    assert "take_pending_replay" in rig.store.calls
    assert guid(901) in {m.msgid for m in rig.store.stored()}


async def test_v2_a_replay_batch_drops_its_registry_entries_in_one_store_write(v2rig: Rig) -> None:
    rig = v2rig
    for i in range(1, 4):
        await rig.publish(i, payload=f"m{i}".encode())
    queued: list[WriteOp] = []
    submit = rig.writer.submit

    def noting(op: WriteOp, source: str = "", spill_in: float | None = None) -> Entry:
        queued.append(op)
        return submit(op, source, spill_in)

    rig.writer.submit = noting  # type: ignore[method-assign]
    rig.logic.session_subscribed(client(), "t/a", 1)
    await rig.settle()
    assert not [op for op in queued if isinstance(op, DropPendingReplay)]  # no writer op per replayed message
    drops = [[op for op in ops if isinstance(op, DropPendingReplay)] for ops in rig.store.writes]
    assert [len(d) for d in drops if d] == [3]  # one write, once publish/bulk has answered
    assert not any(rig.store.pending.values())
    assert len(rig.store.stored()) == 3  # re-keyed, not stored again


async def test_v2_a_replay_whose_hook_call_was_lost_leaves_no_pending_entry(v2rig: Rig) -> None:
    rig = v2rig
    await rig.publish(1, payload=b"ON")
    rig.api.lost_hooks = 1  # the broker gave up on the replay's message.publish and published it anyway
    rig.logic.session_subscribed(client(), "t/a", 1)
    await rig.settle()
    assert not rig.store.pending[("t/a", payload_digest(b"ON"))]
    # later an application publishes the same content through the REST API: a new message
    await rig.publish(2, sender=HTTP_API, payload=b"ON")
    await rig.settle()
    assert [m.msgid for m in rig.store.stored()] == [guid(1), guid(2)]
    assert rig.metrics.sample("messages_skipped_total", reason="replay") == 0


async def test_v2_a_retried_publish_bulk_registers_its_replays_again(v2rig: Rig) -> None:
    rig = v2rig
    await rig.publish(1, payload=b"a")
    await rig.publish(2, payload=b"b")
    rig.api.fail_after_publishing = 1  # the broker published (and ran the hooks), the answer was lost
    rig.logic.session_subscribed(client(), "t/a", 1)
    await rig.settle()
    assert len(rig.api.published) == 2
    # both tries came back as replays: nothing stored twice, nothing left registered
    assert len(rig.store.stored()) == 2
    assert rig.metrics.sample("messages_skipped_total", reason="replay") == 4
    assert not any(rig.store.pending.values())


def test_local_replays_discard_forgets_one_entry_per_item() -> None:
    local = LocalReplays()
    a, b = PendingReplay("t/a", "d", guid(1)), PendingReplay("t/a", "d", guid(2))
    local.add([a, a, b])  # two replays of one message in flight at once
    assert local.take("t/a", "d") == guid(1)  # one replay of message 1 came back
    local.discard([a])  # the other one's call was answered without it
    local.discard([a])  # nothing left of it: a no-op
    assert local.take("t/a", "d") == guid(2)  # an entry of another message stays
    assert local.take("t/a", "d") is None


async def test_a_subscription_the_store_cannot_hold_still_gets_its_replay(rig: Rig) -> None:
    long_id = "c" * 100
    rig.store.refuse_clientids.add(long_id)
    await rig.publish(1)
    rig.logic.session_subscribed(client(long_id), "t/a", 1)
    await rig.settle()
    assert [item.origin for item in rig.api.replayed] == [guid(1)]
    assert rig.metrics.sample("writes_rejected_total", backend="memory", reason="too_long") == 1


async def test_unsubscribe_forgets_the_subscription(rig: Rig) -> None:
    rig.logic.session_subscribed(client(), "t/a", 1)
    rig.logic.session_unsubscribed(client(), "t/a")
    await rig.settle()
    assert rig.store.subs == {"sub": {}}


def test_a_replay_carries_its_origin_and_is_never_retained() -> None:
    item = ReplayItem("t/a", b"\x00\xff", 2, guid(5))
    body = item.to_json()
    assert body["retain"] is False and body["qos"] == 2
    assert body["properties"]["user_properties"] == {"offline-exhook-replay": guid(5)}


async def test_a_restore_session_created_started_waits_for_client_connected(rig: Rig) -> None:
    await rig.store.save_subscription("sub", "t/a", 1)
    rig.logic.session_created(client())
    for _ in range(20):  # the restore has read the store and waits for the broker to register the client
        await asyncio.sleep(0)
    assert rig.api.subscribed == [] and "subscriptions" not in rig.store.calls
    rig.logic.client_connected(client())  # it is registered: one restore, not two
    await rig.settle()
    assert rig.api.subscribed == [("sub", [("t/a", 1)])]


async def test_a_resume_whose_connected_call_was_lost_does_not_skip_the_next_connections_restore(
        rig: Rig) -> None:
    await rig.store.save_subscription("sub", "t/a", 1)
    rig.logic.session_resumed(client(peerport=1001))  # its client.connected is lost
    # the client comes back on a new connection to a new session whose session.created is lost too
    rig.logic.client_connected(client(peerport=1002))
    await rig.settle()
    assert rig.api.subscribed == [("sub", [("t/a", 1)])]


async def test_a_resume_of_the_session_whose_restore_had_not_begun_restores_it_once(rig: Rig) -> None:
    # Connect A makes a fresh session and its client.connected is lost; before A's
    # restore begins (paced, or waiting for that call), the client connects again and
    # resumes that same session, which never got its subscriptions back.
    await rig.store.save_subscription("sub", "t/a", 1)
    await rig.publish(1)
    rig.logic.session_created(client(peerport=1001))
    rig.logic.session_resumed(client(peerport=1002))
    rig.logic.client_connected(client(peerport=1002))
    await rig.settle()
    assert rig.api.subscribed == [("sub", [("t/a", 1)])]
    assert [item.origin for item in rig.api.replayed] == [guid(1)]


async def test_a_resume_after_the_restore_began_restores_nothing_again(rig: Rig) -> None:
    await rig.store.save_subscription("sub", "t/a", 1)
    rig.logic.session_created(client(peerport=1001))  # its client.connected is lost
    await rig.settle()  # the restore went ahead after its wait
    assert rig.api.subscribed == [("sub", [("t/a", 1)])]
    rig.logic.session_resumed(client(peerport=1002))  # the broker kept what it gave back
    rig.logic.client_connected(client(peerport=1002))
    await rig.settle()
    assert rig.api.subscribed == [("sub", [("t/a", 1)])]


async def test_a_restore_replays_even_when_its_session_subscribed_call_is_lost(rig: Rig) -> None:
    # in a storm the broker's session.subscribed call for a restored filter can time out;
    # the broker then carries on without it, so the restore must not depend on it
    await rig.publish(1)
    await rig.publish(2, topic="other/a")  # untracked: a restored filter on it replays nothing
    await rig.store.save_subscription("sub", "t/#", 1)
    await rig.store.save_subscription("sub", "other/a", 1)
    rig.logic.client_connected(client())
    await rig.settle()
    assert [item.origin for item in rig.api.replayed] == [guid(1)]
    # when the call does arrive it replays nothing a second time
    rig.logic.session_subscribed(client(), "t/#", 1)
    rig.logic.session_subscribed(client(), "other/a", 1)
    await rig.settle()
    assert [item.origin for item in rig.api.replayed] == [guid(1)]


async def subscribe_again_is_stored(rig: Rig) -> None:
    """The client's own subscribe of t/a at qos 1 (the qos the restore gave it) is stored."""
    rig.logic.session_subscribed(client(), "t/a", 1)
    await rig.settle()
    assert rig.store.subs["sub"] == {"t/a": 1}


async def test_the_broker_s_call_for_a_restored_subscription_does_not_store_it_again(rig: Rig) -> None:
    # the restore read it from the store a moment ago: writing it back is a store round
    # trip per client per filter in a reconnect storm, for nothing
    await rig.store.save_subscription("sub", "t/a", 1)
    await rig.store.save_subscription("sub", "t/b", 1)
    rig.logic.client_connected(client())
    await rig.settle()
    rig.store.calls.clear()
    rig.logic.session_subscribed(client(), "t/a", 1)  # the broker's calls for the restored filters
    rig.logic.session_subscribed(client(), "t/b", 1)
    await rig.settle()
    assert "save_subscription" not in rig.store.calls
    # what the client subscribes itself afterwards is stored: a new qos, a new filter
    rig.logic.session_subscribed(client(), "t/a", 2)
    rig.logic.session_subscribed(client(), "t/c", 1)
    await rig.settle()
    assert rig.store.calls.count("save_subscription") == 2
    assert rig.store.subs["sub"] == {"t/a": 2, "t/b": 1, "t/c": 1}


async def test_a_restored_filter_unsubscribed_and_subscribed_again_is_stored_again(rig: Rig) -> None:
    # the broker's session.subscribed for the restored filter was lost (a storm); the
    # client then unsubscribes and subscribes again, same qos: the row must come back
    await rig.store.save_subscription("sub", "t/a", 1)
    rig.logic.client_connected(client())
    await rig.settle()
    rig.logic.session_unsubscribed(client(), "t/a")
    await rig.settle()
    assert rig.store.subs["sub"] == {}
    await subscribe_again_is_stored(rig)


async def test_an_unsubscribe_while_the_restore_waits_for_its_subscribe_is_not_undone(rig: Rig) -> None:
    # the restore waits for subscribe/bulk; the broker has applied it, its session.subscribed
    # is lost, and the client unsubscribes: its next subscribe (same qos) must be stored
    await rig.store.save_subscription("sub", "t/a", 1)
    answer = asyncio.Event()
    asked = asyncio.Event()
    recorded = rig.api.subscribe_bulk

    async def slow(clientid: str, subscriptions: list[tuple[str, int]]) -> bool:
        asked.set()
        await answer.wait()
        return await recorded(clientid, subscriptions)

    rig.api.subscribe_bulk = slow  # type: ignore[method-assign]
    rig.logic.client_connected(client())
    await asyncio.wait_for(asked.wait(), 5)
    rig.logic.session_unsubscribed(client(), "t/a")
    answer.set()
    await rig.settle()
    assert rig.store.subs["sub"] == {}
    await subscribe_again_is_stored(rig)


async def test_a_new_connect_forgets_what_the_previous_restore_gave_back(rig: Rig) -> None:
    # EMQX 5.3 (no peer port): the next connection has the same key. The first restore's
    # session.subscribed was lost; the client unsubscribed through another instance.
    await rig.store.save_subscription("sub", "t/a", 1)
    rig.logic.client_connected(client())
    await rig.settle()
    await rig.store.delete_subscription("sub", "t/a")
    rig.logic.session_created(client())
    rig.logic.client_connected(client())
    await rig.settle()
    await subscribe_again_is_stored(rig)


async def test_the_sweep_s_restore_leaves_the_subscriptions_to_be_stored_by_the_broker_s_calls(rig: Rig) -> None:
    # its session.subscribed may go to another worker: nothing is noted that only this one would consume
    await rig.store.save_subscription("sub", "t/a", 1)
    assert rig.logic.restore_missed(client(peerport=5000))
    await rig.settle()
    rig.store.calls.clear()
    rig.logic.session_subscribed(client(peerport=5000), "t/a", 1)
    await rig.settle()
    assert rig.store.calls.count("save_subscription") == 1


async def test_a_restore_replays_again_when_the_broker_had_not_applied_the_subscription_yet(rig: Rig) -> None:
    # subscribe/bulk answers before the client's process applies the subscription (it is
    # still in a hook): the first replay reaches nobody and the marks are already claimed,
    # so without a second try this connection would never get the message
    await rig.publish(1)
    await rig.store.save_subscription("sub", "t/#", 1)
    rig.api.unrouted = 2
    rig.logic.client_connected(client())
    await rig.settle()
    assert [[item.origin for item in batch] for batch in rig.api.published] == [[guid(1)]] * 3
    assert rig.metrics.sample("messages_replayed_total") == 1  # delivered once
    rig.logic.session_subscribed(client(), "t/#", 1)  # the broker's call once it applied it
    await rig.settle()
    assert len(rig.api.published) == 3


async def test_a_restore_gives_up_on_a_client_that_left_after_its_subscribe(rig: Rig) -> None:
    await rig.publish(1)
    await rig.publish(2, topic="w/1/x")
    await rig.store.save_subscription("sub", "t/#", 1)
    await rig.store.save_subscription("sub", "w/+/x", 1)
    rig.api.unrouted = 100
    rig.logic.client_connected(client())
    await rig.settle()
    # QUICK_PATIENCE: three tries for the first filter; the second, once the client is
    # known to have left, gets one
    assert len(rig.api.published) == 4
    assert rig.metrics.sample("messages_replayed_total") == 0
    assert sorted(m.msgid for m in rig.store.stored()) == [guid(1), guid(2)]  # kept for the next connect


async def test_a_replay_on_session_subscribed_that_reaches_nobody_is_not_repeated(rig: Rig) -> None:
    # the broker fires session.subscribed once the subscription exists: nobody matched
    # means the client left, and trying again would only cost the broker calls
    await rig.publish(1)
    rig.api.unrouted = 1
    rig.logic.session_subscribed(client(), "t/#", 1)
    await rig.settle()
    assert len(rig.api.published) == 1
    assert rig.metrics.sample("messages_replayed_total") == 0


async def test_a_restore_of_a_client_that_left_replays_nothing(rig: Rig) -> None:
    await rig.publish(1)
    await rig.store.save_subscription("sub", "t/a", 1)

    async def gone(clientid: str, subscriptions: list[tuple[str, int]]) -> bool:
        return False  # 404: the client disconnected before its restore

    rig.api.subscribe_bulk = gone  # type: ignore[method-assign]
    rig.logic.client_connected(client())
    await rig.settle()
    assert rig.api.replayed == []


def quick_register_retries(monkeypatch: pytest.MonkeyPatch, backoff: Backoff, attempts: int,
                           register_wait_s: float) -> None:
    """Shorter waits for a client the broker has not registered (hooks._REGISTER_WAIT_S)
    and shorter pauses between the tries of its 404s (replay.UNTIL_REGISTERED)."""
    monkeypatch.setattr(replay, "UNTIL_REGISTERED", replace(replay.UNTIL_REGISTERED, backoff=backoff,
                                                            attempts=attempts))
    monkeypatch.setattr(hooks, "_REGISTER_WAIT_S", register_wait_s)


async def test_a_restore_whose_client_resumed_on_a_connection_not_registered_yet_asks_again(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    # session.created of A (its client.connected lost) started a restore; the client then
    # resumes that session on B, which cancels A's wait for client.connected but not the
    # restore, and B is registered at the broker only a moment later: a 404 then does not
    # mean the client left (B's client.connected restores nothing: a resume)
    quick_register_retries(monkeypatch, Backoff(0.02, 0.05), attempts=30, register_wait_s=0.05)
    await rig.store.save_subscription("sub", "t/a", 1)
    registered = False

    async def bulk(clientid: str, subscriptions: list[tuple[str, int]]) -> bool:
        rig.api.subscribed.append((clientid, subscriptions))
        return registered

    rig.api.subscribe_bulk = bulk  # type: ignore[method-assign]
    reading, go_on = asyncio.Event(), asyncio.Event()
    read = rig.replayer.stored_subscriptions

    async def slow_read(*args: Any, **kwargs: Any) -> Any:
        reading.set()
        await go_on.wait()
        return await read(*args, **kwargs)

    rig.replayer.stored_subscriptions = slow_read  # type: ignore[method-assign]
    rig.logic.session_created(client("sub", peerport=1))
    await reading.wait()
    rig.logic.session_resumed(client("sub", peerport=2))
    go_on.set()

    def broker_registers_b() -> None:
        nonlocal registered
        registered = True

    asyncio.get_running_loop().call_later(0.3, broker_registers_b)
    rig.logic.client_connected(client("sub", peerport=2))
    await rig.settle()
    assert registered and len(rig.api.subscribed) > 1  # asked again until B was there


class HangingStore(MemoryStore):
    """A store whose writes never return (a paused server)."""

    async def write(self, ops: object) -> None:  # type: ignore[override]
        await asyncio.Event().wait()


async def test_a_publish_the_store_cannot_take_is_answered_at_its_deadline_and_spooled(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    await spool.open()
    rig = Rig(HangingStore(), spool)  # publish_deadline 500 ms: spilled 50 ms before
    task = asyncio.create_task(rig.writer.run())
    try:
        await asyncio.wait_for(asyncio.gather(rig.publish(1, sender="a"), rig.publish(2, sender="b")), 10)
        assert [op.message.msgid for op in (s.op for s in await spool.head(10))  # type: ignore[union-attr]
                ] == [guid(1), guid(2)]
        assert rig.metrics.deadline["store_slow"]._value.get() == 2
        assert rig.metrics.messages_stored._value.get() == 0
    finally:
        await rig.writer.close(0.1)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await spool.close()


async def test_a_reconnect_from_the_same_port_replays_the_unacked_message_again(rig: Rig) -> None:
    # a device that reconnects from the same host and port (a fixed local port, a reboot
    # that starts its ports over) has the same connection key: the marks must be reset
    await rig.publish(1)
    await rig.store.save_subscription("sub", "t/a", 1)
    rig.logic.client_connected(client(peerport=40000))
    await rig.settle()
    rig.logic.client_connected(client(peerport=40000))
    await rig.settle()
    assert [item.origin for item in rig.api.replayed] == [guid(1), guid(1)]


async def test_a_sweep_resubscribes_a_client_whose_connect_hooks_never_ran_and_leaves_the_replay(rig: Rig) -> None:
    await rig.publish(1)
    await rig.store.save_subscription("sub", "t/a", 1)
    assert rig.logic.restore_missed(client(peerport=5001))
    await rig.settle()
    assert rig.api.subscribed == [("sub", [("t/a", 1)])]
    assert rig.api.replayed == [] and "reset_replay_marks" not in rig.store.calls
    # the broker's session.subscribed for the restored filter (to the worker owning the client) replays it
    rig.logic.session_subscribed(client(peerport=5001), "t/a", 1)
    await rig.settle()
    assert [item.origin for item in rig.api.replayed] == [guid(1)]


async def test_a_sweep_before_the_client_s_own_late_restore_replays_nothing_twice(rig: Rig) -> None:
    # another worker's sweep re-subscribes the client before this worker's paced restore
    # (or a late handler) runs: the restore resets the marks and replays; the broker's
    # session.subscribed calls for both subscribes then replay nothing more
    await rig.publish(1)
    await rig.store.save_subscription("sub", "t/a", 1)
    assert rig.logic.restore_missed(client(peerport=5001))
    await rig.settle()
    rig.logic.client_connected(client(peerport=5001))
    await rig.settle()
    for _ in range(2):
        rig.logic.session_subscribed(client(peerport=5001), "t/a", 1)
    await rig.settle()
    assert [item.origin for item in rig.api.replayed] == [guid(1)]


async def test_a_sweep_does_not_restore_a_connection_its_hook_restored(rig: Rig) -> None:
    await rig.store.save_subscription("sub", "t/a", 1)
    rig.logic.client_connected(client(peerport=5001))
    await rig.settle()
    assert not rig.logic.restore_missed(client(peerport=5001))
    assert rig.logic.restore_missed(client(peerport=5002))  # a later connection
    await rig.settle()
    assert len(rig.api.subscribed) == 2


async def test_a_replay_of_an_earlier_connect_is_recognised_after_the_clients_entry_was_evicted(rig: Rig) -> None:
    # the connect numbers come from one sequence: a client that comes back after its
    # entry was evicted (a storm of other clients) gets a number no job took before
    logic = rig.logic
    logic._connects = ExpiringMap(600, 2)
    logic.session_created(client("back", peerport=1))
    earlier = logic._same_connect("back")
    assert earlier()
    for i in range(3):
        logic.session_created(client(f"other{i}", peerport=1))  # evicts "back"
    logic.session_created(client("back", peerport=2))
    assert not earlier()
    await rig.settle()


async def test_the_unsubscribes_noted_for_a_restore_are_bounded_per_connection(rig: Rig) -> None:
    # a client churning through filters must not grow the note without end
    churner = client("churner", peerport=3)
    for i in range(1005):
        rig.logic.session_unsubscribed(churner, f"t/{i}")
    assert len(rig.logic._dropped.get(churner.connection) or ()) == 1000
    await rig.settle()


class SubscribesUnanswered:
    """The broker applying each restore's subscribe/bulk: its session.subscribed calls
    come ``after_s`` later (``fire``: to the hook logic; else they are lost), and
    ``most`` is the largest number of clients subscribed with their calls still to come."""

    def __init__(self, rig: Rig, after_s: float, fire: bool) -> None:
        self._rig, self._after, self._fire = rig, after_s, fire
        self._waiting: set[str] = set()
        self.most = 0
        rig.api.on_subscribed = self.applied

    def applied(self, clientid: str, subscriptions: list[tuple[str, int]]) -> None:
        self._waiting.add(clientid)
        self.most = max(self.most, len(self._waiting))
        asyncio.get_running_loop().call_later(self._after, self._came, clientid, subscriptions)

    def _came(self, clientid: str, subscriptions: list[tuple[str, int]]) -> None:
        self._waiting.discard(clientid)
        if self._fire:
            for topic, qos in subscriptions:
                self._rig.logic.session_subscribed(client(clientid), topic, qos)


async def restore_clients(rig: Rig, count: int) -> list[str]:
    """``count`` clients, each with a stored filter, connect; once their restores ran:
    their ids."""
    clients = [f"c{i}" for i in range(count)]
    for i, name in enumerate(clients):
        await rig.store.save_subscription(name, f"t/{i}", 1)
    for name in clients:
        rig.logic.client_connected(client(name))
    await rig.settle()
    return clients


async def test_restores_take_turns_so_the_broker_s_calls_for_them_do_not_pile_up(rig: Rig) -> None:
    # grpc takes the calls of one method in one at a time: restores subscribing far
    # faster than the broker's session.subscribed calls are taken in left those calls
    # waiting seconds at the broker (a reconnect storm). At most max_turns restores are
    # between their subscribe and the end of their wait for the calls.
    rig.logic._subscribed_calls = SubscribedCalls(30, 100, max_turns=2)
    rig.logic._subscribed_wait = 5.0
    broker = SubscribesUnanswered(rig, after_s=0.05, fire=True)
    clients = await restore_clients(rig, 6)
    assert sorted(c for c, _ in rig.api.subscribed) == clients  # every client restored
    assert broker.most == 2


async def test_a_restore_that_cannot_step_out_of_its_slot_goes_on_without_a_turn(rig: Rig) -> None:
    # waiting for a turn in its slot could keep a restore holding a turn from the slot
    # it needs to finish (a deadlock once a thousand jobs are out of their slots)
    rig.logic._subscribed_calls = SubscribedCalls(30, 100, max_turns=1)
    rig.logic._subscribed_wait = 1.0  # the calls never come: a turn would be held that long
    rig.queues._max_out = 0
    broker = SubscribesUnanswered(rig, after_s=0.2, fire=False)
    clients = await restore_clients(rig, 3)
    assert sorted(c for c, _ in rig.api.subscribed) == clients
    assert broker.most == 3


async def test_a_restore_replays_each_filter_once_its_session_subscribed_call_has_arrived(rig: Rig) -> None:
    # the broker applies the restore's subscribe/bulk a moment after answering it: a replay
    # started at once would reach nobody; waiting for the calls (the route exists then)
    # needs no second try
    rig.logic._subscribed_wait = 5.0
    await rig.publish(1)
    await rig.publish(2, topic="w/1/x")
    await rig.store.save_subscription("sub", "t/#", 1)
    await rig.store.save_subscription("sub", "w/+/x", 1)
    rig.broker_calls_session_subscribed(after_s=0.05)
    started = time.monotonic()
    rig.logic.client_connected(client())
    await rig.settle()
    assert time.monotonic() - started < 4  # woken by the calls, not by the end of the 5 s wait
    assert sorted(rig.api.events[:2]) == [("subscribed", "t/#"), ("subscribed", "w/+/x")]
    assert rig.api.events[2:] == [("publish", "t/a"), ("publish", "w/1/x")]


async def test_a_filter_the_restore_replayed_after_its_call_arrived_is_not_claimed_again(rig: Rig) -> None:
    # that call's job would read the latest positions and claim them for nothing: two
    # store round trips per restored filter in a reconnect storm
    await rig.publish(1)
    await rig.store.save_subscription("sub", "t/#", 1)
    await rig.store.save_subscription("sub", "w/+/x", 1)
    rig.broker_calls_session_subscribed(after_s=0)
    rig.logic.client_connected(client())
    await rig.settle()
    reads = [c for c in rig.store.calls if c in ("stored_topics", "latest_positions", "claim_replay")]
    # the restore's, one filter after the other (w/+/x has nothing stored); none of the calls' jobs
    assert reads == ["stored_topics", "latest_positions", "claim_replay", "stored_topics"]
    assert [item.origin for item in rig.api.replayed] == [guid(1)]
    # a later subscribe of the same filter in this connection replays as usual
    await rig.publish(3)
    rig.logic.session_subscribed(client(), "t/#", 1)
    await rig.settle()
    assert [item.origin for item in rig.api.replayed] == [guid(1), guid(3)]


async def test_a_call_of_an_earlier_connection_with_the_same_key_does_not_count(rig: Rig) -> None:
    # EMQX 5.3 (no peer port): the client subscribed to t/# itself in its last connection
    # (restored, with nothing to give back). The new connection's restore must wait for
    # its own call, not take that one's.
    rig.logic._subscribed_wait = 5.0
    rig.logic.client_connected(client())
    rig.logic.session_subscribed(client(), "t/#", 1)
    await rig.settle()
    assert rig.store.subs["sub"] == {"t/#": 1}
    await rig.publish(1)
    rig.api.events.clear()
    rig.broker_calls_session_subscribed(after_s=0.05)
    started = time.monotonic()
    rig.logic.session_created(client())
    rig.logic.client_connected(client())
    await rig.settle()
    assert time.monotonic() - started < 4
    assert rig.api.events == [("subscribed", "t/#"), ("publish", "t/a")]


async def test_a_restore_whose_replay_stopped_early_leaves_the_call_s_job_to_replay(rig: Rig) -> None:
    # the route existed, but the client left during the replay (its second batch reached
    # nobody): not noted as covered, so the call's own job tries the filter again
    for i in range(1, 5):
        await rig.publish(i)
    await rig.store.save_subscription("sub", "t/#", 1)
    rig.api.routed_calls = 1  # batches of 3: the first reaches the client, the second nobody
    rig.broker_calls_session_subscribed(after_s=0)
    rig.logic.client_connected(client())
    await rig.settle()
    assert rig.metrics.sample("messages_replayed_total") == 3
    assert rig.store.calls.count("claim_replay") == 2


async def test_a_filter_whose_call_came_after_the_restore_s_replay_is_replayed_by_that_call(rig: Rig) -> None:
    # the call was late (after the restore's wait): the restore's replay may have read its
    # range before the route existed, so a message stored meanwhile is that call's to replay
    await rig.publish(1)
    await rig.store.save_subscription("sub", "t/#", 1)
    rig.logic.client_connected(client())
    await rig.settle()
    await rig.publish(2)  # stored before the broker applied the subscription: routed to nobody
    rig.logic.session_subscribed(client(), "t/#", 1)
    await rig.settle()
    assert [item.origin for item in rig.api.replayed] == [guid(1), guid(2)]


async def test_a_reconnect_wakes_the_earlier_connection_s_restore_from_its_wait(rig: Rig) -> None:
    # its calls will not come now: the new connection's restore, queued behind it, must
    # not wait out the whole wait for them
    rig.logic._subscribed_wait = 30.0
    await rig.store.save_subscription("sub", "t/a", 1)
    started = time.monotonic()
    rig.logic.client_connected(client())
    await rig.restore_subscribed()  # it waits for the broker's call now
    rig.broker_calls_session_subscribed(after_s=0)
    rig.logic.session_created(client())  # a new connect with the same key (EMQX 5.3)
    rig.logic.client_connected(client())
    await rig.settle()
    assert time.monotonic() - started < 10
    assert len(rig.api.subscribed) == 2


class HeldWrites(MemoryStore):
    """A store whose writes wait until released (a paused server); reads answer."""

    def __init__(self) -> None:
        super().__init__()
        self.released = asyncio.Event()

    async def write(self, ops: object) -> None:  # type: ignore[override]
        await self.released.wait()
        await super().write(ops)  # type: ignore[arg-type]


async def test_a_filter_replayed_while_messages_wait_in_the_spool_is_read_again_by_its_call(tmp_path: Path) -> None:
    # a message answered from the spool (the store too slow) is not in the store yet when
    # the restore reads its range: the call's job must not skip its own read
    store = HeldWrites()
    async with running_rig(tmp_path, store) as rig:
        try:
            await store.save_subscription("sub", "t/#", 1)
            await asyncio.wait_for(rig.publish(1), 10)  # answered at its deadline, from the spool
            assert rig.writer.spooling and not store.messages
            rig.broker_calls_session_subscribed(after_s=0)
            rig.logic.client_connected(client())
            for _ in range(200):
                if store.calls.count("stored_topics") == 2:
                    break
                await asyncio.sleep(0.01)
            assert rig.writer.spooling
            assert store.calls.count("stored_topics") == 2  # the restore's read and the call's
        finally:
            store.released.set()  # the writer can stop


async def test_a_restore_waiting_for_its_calls_leaves_its_slot_to_other_clients(tmp_path: Path) -> None:
    # a call that is lost keeps its restore waiting for seconds: with the only slot held
    # meanwhile, every other client's work would wait as long
    async with running_rig(tmp_path, MemoryStore()) as rig:
        rig.queues = rig.logic._queues = ClientQueues(rig.metrics, slots=AdaptiveLimit(initial=1, maximum=1,
                                                                                        sampler=HandFed()))
        rig.logic._subscribed_wait = 30.0
        await rig.publish(1, topic="t/other")
        await rig.store.save_subscription("sub", "t/a", 1)
        rig.logic.client_connected(client())  # its session.subscribed call never comes
        await rig.restore_subscribed()
        rig.logic.session_subscribed(client("other"), "t/other", 1)
        for _ in range(100):
            if rig.api.replayed:
                break
            await asyncio.sleep(0.01)
        assert [item.origin for item in rig.api.replayed] == [guid(1)]  # the other client's replay ran


async def test_a_restore_gives_its_turn_back_before_it_waits_for_its_slot_again(tmp_path: Path) -> None:
    # its wait for the calls is over; another client's job holds the only slot: waiting
    # for it with the turn still taken would hold every other restore back too
    async with running_rig(tmp_path, MemoryStore()) as rig:
        rig.queues = rig.logic._queues = ClientQueues(rig.metrics, slots=AdaptiveLimit(initial=1, maximum=1,
                                                                                        sampler=HandFed()))
        calls = rig.logic._subscribed_calls = SubscribedCalls(30, 100, max_turns=1)
        rig.logic._subscribed_wait = 0.1  # the call never comes
        await rig.store.save_subscription("sub", "t/a", 1)
        rig.logic.client_connected(client())
        await rig.restore_subscribed()
        leave = asyncio.Event()
        rig.queues.submit("busy", "busy", leave.wait)  # takes the slot the restore stepped out of
        await asyncio.sleep(0.2)  # the restore's wait is over: it waits for the slot
        assert rig.queues._resuming
        async with asyncio.timeout(2):
            async with calls.turn():  # the next restore's turn
                pass
        leave.set()
        await rig.settle()
        assert [c for c, _ in rig.api.subscribed] == ["sub"]


async def test_a_restore_retrying_a_404_leaves_its_turn_to_others_between_tries(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    # a client that left during its connect is asked for seconds (it may only not be
    # registered yet): holding a turn all that time would stall the other restores
    quick_register_retries(monkeypatch, Backoff(0.05, 0.1), attempts=20, register_wait_s=0.01)
    rig.logic._subscribed_calls = SubscribedCalls(30, 100, max_turns=1)
    rig.logic._subscribed_wait = 0.05
    await rig.store.save_subscription("gone", "t/a", 1)
    await rig.store.save_subscription("b", "t/b", 1)
    asked: list[str] = []
    retrying, b_asked = asyncio.Event(), asyncio.Event()

    async def bulk(clientid: str, subscriptions: list[tuple[str, int]]) -> bool:
        asked.append(clientid)
        if asked.count("gone") == 2:
            retrying.set()
        if clientid == "b":
            b_asked.set()
        return clientid != "gone"  # 404 for the client that left

    rig.api.subscribe_bulk = bulk  # type: ignore[method-assign]
    rig.logic.session_created(client("gone"))  # its client.connected never comes
    await retrying.wait()
    rig.logic.client_connected(client("b"))
    async with asyncio.timeout(1):  # not after gone's ~2 s of tries
        await b_asked.wait()
    assert asked.count("gone") < 20  # still trying
    await rig.settle()


async def test_with_one_call_lost_only_the_filter_whose_call_arrived_is_covered(rig: Rig) -> None:
    # the broker applied both restored filters; the call for w/+/x was lost: the restore
    # waits out its wait, replays both, and covers t/# only
    await rig.publish(1)
    await rig.publish(2, topic="w/1/x")
    await rig.store.save_subscription("sub", "t/#", 1)
    await rig.store.save_subscription("sub", "w/+/x", 1)
    lost = {"w/+/x"}

    def applied(clientid: str, subscriptions: list[tuple[str, int]]) -> None:
        for topic, qos in subscriptions:
            if topic not in lost:
                asyncio.get_running_loop().call_soon(rig.logic.session_subscribed, client(clientid), topic, qos)

    rig.api.on_subscribed = applied
    rig.logic.client_connected(client())
    await rig.settle()
    assert [item.origin for item in rig.api.replayed] == [guid(1), guid(2)]
    assert rig.store.calls.count("claim_replay") == 2  # the restore's, one per filter
    rig.logic.session_subscribed(client(), "w/+/x", 1)  # the lost call comes after all: not covered
    await rig.settle()
    assert rig.store.calls.count("claim_replay") == 3
    assert [item.origin for item in rig.api.replayed] == [guid(1), guid(2)]


class WritesRefused(MemoryStore):
    """Reads work, writes fail (Redis out of memory, MySQL read_only): the writer spools."""

    refuse = False

    async def write(self, ops: Sequence[WriteOp]) -> None:
        if self.refuse:
            raise StoreError("OOM command not allowed when used memory > 'maxmemory'")
        await super().write(ops)


async def test_a_replay_waiting_for_the_writer_to_catch_up_leaves_its_slot_to_other_clients(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the writer cannot catch up while the store refuses writes: that wait must not hold
    # the only slot, or every other client's restores and replays wait behind it
    monkeypatch.setattr(hooks, "_CAUGHT_UP_WAIT_S", 3600.0)
    store = WritesRefused()
    async with running_rig(tmp_path, store) as rig:
        rig.queues = rig.logic._queues = ClientQueues(
            rig.metrics, slots=AdaptiveLimit(initial=1, maximum=1, sampler=HandFed()))
        await rig.publish(1, topic="t/a")
        await rig.publish(2, topic="t/other")
        await store.save_subscription("gone", "t/a", 1)
        store.refuse = True
        await rig.publish(3, topic="t/x")  # answered from the spool: the writer spools now
        assert rig.writer.spooling
        rig.api.routed_calls = 0  # the client left: its replay reaches nobody and waits for the writer
        published = {"t/a": asyncio.Event(), "t/other": asyncio.Event()}
        bulk = rig.api.publish_bulk

        async def watched(items: list[ReplayItem]) -> BulkResult:
            result = await bulk(items)
            published[items[0].topic].set()
            return result

        rig.api.publish_bulk = watched  # type: ignore[method-assign]
        rig.logic.client_connected(client("gone"))
        await published["t/a"].wait()
        rig.logic.session_subscribed(client("other"), "t/other", 1)
        async with asyncio.timeout(10):  # not a timing: without the fix it never comes
            await published["t/other"].wait()
        store.refuse = False
        await rig.settle()


async def test_unsubscribes_noted_for_a_restore_cost_a_few_bytes_per_filter(rig: Rig) -> None:
    # noted for every connection, for two minutes: a client unsubscribing from long
    # filters on connection after connection must not hold their text
    long_filter = "x" * 60_000 + "/{:04d}"
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(1000):
            rig.logic.session_unsubscribed(client("u", peerport=1), long_filter.format(i))
        await rig.settle()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < 2_000_000  # kept as text, 1,000 filters of 60 KB are 60 MB
    assert rig.logic._was_dropped(client("u", peerport=1), long_filter.format(7))


async def busy_restore(rig: Rig) -> asyncio.Event:
    """A restore of client "sub" whose subscribe/bulk call hangs until the event is set:
    the client's later jobs queue behind it."""
    await rig.store.save_subscription("sub", "t/old", 1)
    release = asyncio.Event()
    bulk = rig.api.subscribe_bulk

    async def hanging(clientid: str, subscriptions: list[tuple[str, int]]) -> bool:
        await release.wait()
        return await bulk(clientid, subscriptions)

    rig.api.subscribe_bulk = hanging  # type: ignore[method-assign]
    rig.logic.client_connected(client())
    return release


async def test_a_subscribe_of_thousands_of_filters_behind_a_busy_job_stores_every_one(rig: Rig) -> None:
    # one job per filter overflowed the client's queue (1,000 jobs): the rest were never stored
    release = await busy_restore(rig)
    for i in range(5000):
        rig.logic.session_subscribed(client(), f"t/f{i}", 1)
    release.set()
    await rig.settle()
    assert set(rig.store.subs["sub"]) == {"t/old", *(f"t/f{i}" for i in range(5000))}
    assert rig.metrics.sample("client_jobs_dropped_total") == 0


async def test_an_unsubscribe_of_thousands_of_filters_behind_a_busy_job_deletes_every_one(rig: Rig) -> None:
    # one job per filter overflowed the client's queue: the rest stayed stored, and the
    # next connect's restore gave the client filters it had unsubscribed from
    for i in range(3000):
        await rig.store.save_subscription("sub", f"t/f{i}", 1)
    release = await busy_restore(rig)
    for i in range(3000):
        rig.logic.session_unsubscribed(client(), f"t/f{i}")
    release.set()
    await rig.settle()
    assert rig.store.subs["sub"] == {"t/old": 1}
    assert rig.metrics.sample("client_jobs_dropped_total") == 0


async def test_subscribes_and_unsubscribes_queued_together_keep_their_order(rig: Rig) -> None:
    release = await busy_restore(rig)
    rig.logic.session_subscribed(client(), "t/x", 1)
    rig.logic.session_unsubscribed(client(), "t/x")
    rig.logic.session_subscribed(client(), "t/y", 1)  # not into the batch before the unsubscribe
    rig.logic.session_subscribed(client(), "t/z", 1)
    rig.logic.session_unsubscribed(client(), "t/z")
    rig.logic.session_subscribed(client(), "t/z", 2)
    release.set()
    await rig.settle()
    assert rig.store.subs["sub"] == {"t/old": 1, "t/y": 1, "t/z": 2}
