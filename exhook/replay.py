"""Replays stored messages to a subscriber through EMQX's REST API, and restores a
client's subscriptions.

A replay reads the store in pages while the previous batch is being published, so
memory stays flat however many messages are stored; batches go out one after the
other, so the subscriber sees them in stored (arrival) order.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Collection
from typing import NamedTuple

from exhook.client_queue import sleep_outside_slot
from exhook.emqx_api import BulkResult, EmqxApi, EmqxApiError, ReplayItem
from exhook.expiring import ExpiringMap
from exhook.metrics import Metrics
from exhook.retry import retrying, transient
from exhook.topics import TopicSet, is_wildcard, literal_prefix, matches, real_filter
from exhook.validate import filter_problem, topic_problem
from storage.base import PENDING_REPLAY_TTL_S, REPLAY_MARK_TTL_S, Store
from storage.errors import one_line
from storage.model import DropPendingReplay, PendingReplay, StoredMessage, Subscription
from storage.ratelog import RateLimitedLog
from storage.retry import Backoff, RetryPolicy

log = logging.getLogger(__name__)

# EMQX registers a new client's channel only after session.created has returned
# (emqx_cm:create_register_session: emqx_session:create runs the hook, then
# register_channel), so a restore started from that hook can reach the REST API
# before the client is visible there (404). Wait for it, through the one retry policy
# (pauses 0.05, 0.1, 0.2, 0.4, 0.8, then 1 s, jittered: ~7 s in all: a broker busy
# with a reconnect storm registers clients seconds late), before concluding the
# client left. The pauses need no slot of the client queues (sleep_outside_slot; a
# restore's ``pause`` also gives up its turn): a client that left keeps retrying, and
# must not hold up everyone else's work meanwhile.
UNTIL_REGISTERED = RetryPolicy(Backoff(base=0.05, cap=1.0), attempts=14, retryable=transient)


class Replayed(NamedTuple):
    """What a replay sent: ``published`` messages, of which the broker routed
    ``delivered`` to a subscriber. ``reached_nobody``: it stopped at a batch that
    matched no subscriber (the client left, or its subscription is not applied yet).
    ``failed``: it gave up on an error; the part it did not deliver is given back to
    this connection (``Replayer._release``). ``retryable``: that error may pass (a
    store or EMQX API outage), so the replay is worth trying again later."""

    published: int
    delivered: int
    reached_nobody: bool = False
    failed: bool = False
    retryable: bool = False

    @classmethod
    def gave_up(cls, published: int, delivered: int, retryable: bool) -> Replayed:
        # at least one message counted as published and not delivered: a failed replay
        # never reads as one that delivered all it published (a restore would take its
        # filter as covered, and the broker's session.subscribed call would not replay it)
        return cls(max(published, delivered + 1), delivered, failed=True, retryable=retryable)


@dataclasses.dataclass(slots=True)
class _Progress:
    """How far one replay got: ``done`` is, per topic, the position of its last
    message whose batch was answered (what a failure does not give back)."""

    published: int = 0
    delivered: int = 0
    nobody: bool = False
    done: dict[str, float] = dataclasses.field(default_factory=dict)

    def add(self, batch: list[StoredMessage], sent: int, result: BulkResult) -> None:
        self.published += sent
        self.delivered += result.delivered
        for m in batch:  # a batch is in position order: the last one of a topic wins
            self.done[m.topic] = m.position


class NotSubscribedYet(Exception):
    """A restore's replay reached no subscriber: the broker has not applied the
    restored subscription yet (or the client left)."""


# REST subscribe/bulk answers before the broker applies the subscription: the client's
# process applies it once it is out of the hook it is in (the facts: a publish from
# inside client.connected reached nobody), and in a storm a hook can hold it for up to
# EMQX's request_timeout. So a restore's replay that reached nobody tries the same
# range again, with the same pauses as UNTIL_REGISTERED, before concluding the client left.
# (A failure inside a try is not retried here: the calls retry their own.)
UNTIL_SUBSCRIBED = dataclasses.replace(UNTIL_REGISTERED, retryable=lambda exc: isinstance(exc, NotSubscribedYet))


def payload_digest(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()[:32]


class BrokerFlags:
    """What the service learned about the broker from its calls."""

    __slots__ = ("v2_seen", "peerport_nodes")

    # a cluster has a handful of nodes; the bound only stops a hostile caller inventing names
    MAX_NODES = 1000

    def __init__(self) -> None:
        # A v2 broker hides user properties from message.publish, so replays must
        # also be registered in the store to be recognised when they come back.
        self.v2_seen = False
        # The nodes whose calls carried the client's peer port: EMQX 5.4 and later send
        # it, 5.3 does not, and a cluster being upgraded has both. Without it a
        # connection's key repeats at every connect (hooks.ClientRef.connection), so the
        # sweep after dropped connect calls skips that node's clients (missed_connects.py).
        self.peerport_nodes: set[str] = set()

    def saw_peerport(self, node: str) -> None:
        if node not in self.peerport_nodes and len(self.peerport_nodes) < self.MAX_NODES:
            self.peerport_nodes.add(node)


class LocalReplays:
    """The replays this process published to a v2 broker and has not seen come back,
    by topic and payload digest: recognising one here answers its ``message.publish``
    without a store round trip. (The store's registry still has them, for a replay
    that comes back to another instance; see ``DropPendingReplay``.) Bounded: the
    oldest keys go first, and an entry lives as long as the store's, or until the
    publish/bulk call that sent it has been answered (``Replayer._publish_once``)."""

    def __init__(self, max_entries: int = 100_000, ttl_s: float = PENDING_REPLAY_TTL_S) -> None:
        self._max = max_entries
        self._ttl = ttl_s
        self._entries: OrderedDict[tuple[str, str], deque[tuple[str, float]]] = OrderedDict()
        self._count = 0

    def add(self, items: list[PendingReplay]) -> None:
        expires = time.monotonic() + self._ttl
        for item in items:
            key = (item.topic, item.digest)
            ids = self._entries.get(key)
            if ids is None:
                ids = self._entries[key] = deque()
            ids.append((item.msgid, expires))
            self._count += 1
        while self._count > self._max:
            _, dropped = self._entries.popitem(last=False)
            self._count -= len(dropped)

    def take(self, topic: str, digest: str) -> str | None:
        """The original id of a replay with this topic and digest (oldest first)."""
        ids = self._entries.get((topic, digest))
        now = time.monotonic()
        while ids:
            msgid, expires = ids.popleft()
            self._count -= 1
            if expires > now:
                if not ids:
                    del self._entries[(topic, digest)]
                return msgid
        if ids is not None:
            del self._entries[(topic, digest)]
        return None

    def discard(self, items: list[PendingReplay]) -> None:
        """Forget one entry per item (same topic, digest and id), if still here
        (its ``message.publish`` did not reach this process)."""
        for item in items:
            ids = self._entries.get((item.topic, item.digest))
            entry = next((e for e in ids if e[0] == item.msgid), None) if ids else None
            if ids is None or entry is None:
                continue
            ids.remove(entry)
            self._count -= 1
            if not ids:
                del self._entries[(item.topic, item.digest)]


class Replayer:
    def __init__(
        self,
        store: Store,
        api: EmqxApi,
        metrics: Metrics,
        tracked: TopicSet,
        flags: BrokerFlags,
        batch_size: int,
        local: LocalReplays | None = None,
        page_size: int = 500,
        until_subscribed: RetryPolicy = UNTIL_SUBSCRIBED,
    ) -> None:
        self.local = local if local is not None else LocalReplays()
        self._store = store
        self._api = api
        self._metrics = metrics
        self._tracked = tracked
        self._flags = flags
        self._batch_size = batch_size
        self._page_size = max(page_size, batch_size)
        self._until_subscribed = until_subscribed
        # Per connection, the part of its claimed ranges a failed replay did not deliver
        # (topic -> the range (after, up to) to replay again; after None: from the
        # oldest). The store's marks only rise, so the next replay of this connection in
        # this process takes these back into its ranges (Replayer._claim), and a retry
        # replays only them (Replayer._take_given_back).
        self._given_back: ExpiringMap[str, dict[str, tuple[float | None, float]]] = ExpiringMap(
            REPLAY_MARK_TTL_S, 100_000)
        self._logs = RateLimitedLog()  # the replay skips and failures that can recur

    async def stored_subscriptions(self, clientid: str, reset_marks_of: str | None = None) -> list[Subscription]:
        """The client's stored subscriptions. ``reset_marks_of``: a connection that
        starts a fresh session; also forget what an earlier connection with the same
        key was given (in the same store round trip), so that it gets everything
        stored again."""
        if reset_marks_of is None:
            return await retrying("read subscriptions", lambda: self._store.subscriptions(clientid))
        subs = await retrying("reset replay marks and read subscriptions",
                              lambda: self._store.fresh_session_subscriptions(clientid, reset_marks_of))
        self._given_back.pop(reset_marks_of)  # everything is replayed again anyway
        return subs

    async def reset_marks(self, connection: str) -> None:
        """Forget what an earlier connection with the same key was given (when
        ``stored_subscriptions`` could not)."""
        await retrying("reset replay marks", lambda: self._store.reset_replay_marks(connection))
        self._given_back.pop(connection)

    async def restore(self, clientid: str, wait_for_client: bool = False,
                      keep: Callable[[str], bool] = lambda topic: True,
                      stored: list[Subscription] | None = None,
                      pause: Callable[[float], Awaitable[None]] = sleep_outside_slot) -> list[tuple[str, int]]:
        """Re-subscribe a client that connected without a session to its ``stored``
        subscriptions (read here when not given: ``stored_subscriptions``); the broker
        then fires ``session.subscribed`` for each. ``wait_for_client``: the client
        may not be registered at the broker yet (restore started from
        ``session.created``). ``keep``: whether a stored filter is given back (not one
        the client has just unsubscribed). ``pause``: the pauses between the tries of a
        client not registered yet. Returns the (filter, qos) pairs the client now has
        (none when it left first)."""
        subs = stored if stored is not None else await self.stored_subscriptions(clientid)
        pairs = [(s.topic, s.qos) for s in subs if keep(s.topic) and self._restorable(clientid, s.topic, s.qos)]
        if not pairs:
            return []
        restored = await self._subscribe_all(clientid, pairs, wait_for_client, pause)
        self._metrics.restores.inc()
        found = restored is not None
        log.info("subscriptions restored" if found else "client left before its subscriptions were restored",
                 extra={"event": "restore", "clientid": clientid, "subscriptions": len(restored or ()),
                        "client_found": found})
        return restored or []

    def _restorable(self, clientid: str, topic: str, qos: int) -> bool:
        """Whether EMQX can take this stored subscription: one it cannot makes it refuse
        the client's whole subscribe/bulk, so it is left out (counted, logged)."""
        problem = "bad_qos" if qos not in (0, 1, 2) else filter_problem(topic)
        if problem is None:
            return True
        self._metrics.restore_subscriptions_skipped.labels(problem).inc()
        log.error("stored subscription not restored (%s)", problem, extra={
            "event": "subscription_skipped", "clientid": clientid[:200], "topic": topic[:200], "qos": qos})
        return False

    async def _subscribe_all(self, clientid: str, pairs: list[tuple[str, int]],
                             wait_for_client: bool,
                             pause: Callable[[float], Awaitable[None]]) -> list[tuple[str, int]] | None:
        """The pairs the client now has; None if it is not connected. A 400 refuses the
        whole array for one item the checks here did not foresee: then one call each,
        so that one item cannot keep the client's other subscriptions from it."""
        try:
            return pairs if await self._subscribe(clientid, pairs, wait_for_client, pause) else None
        except EmqxApiError as exc:
            if exc.status != 400:
                raise
            log.warning("subscribe/bulk refused (%s): subscribing one by one", exc, extra={
                "event": "subscribe_bulk_refused", "clientid": clientid[:200], "subscriptions": len(pairs)})
        restored: list[tuple[str, int]] = []
        for topic, qos in pairs:
            found = await self._subscribe_one(clientid, topic, qos)
            if found is None:
                return None  # left meanwhile
            if found:
                restored.append((topic, qos))
        return restored

    async def _subscribe_one(self, clientid: str, topic: str, qos: int) -> bool | None:
        """One subscription: True once given, False if EMQX refused it (400: skipped,
        counted, logged), None if the client is not connected."""
        try:
            if not await retrying("subscribe", lambda: self._api.subscribe(clientid, topic, qos)):
                return None
        except EmqxApiError as exc:
            if exc.status != 400:
                raise
            self._metrics.restore_subscriptions_skipped.labels("rejected").inc()
            log.error("stored subscription refused by EMQX: %s", exc, extra={
                "event": "subscription_refused", "clientid": clientid[:200], "topic": topic[:200], "qos": qos})
            return False
        return True

    async def _subscribe(self, clientid: str, pairs: list[tuple[str, int]], wait_for_client: bool,
                         pause: Callable[[float], Awaitable[None]]) -> bool:
        """subscribe/bulk; False if the client is not connected (after waiting for it
        to appear, when asked to)."""
        if not wait_for_client:
            return await retrying("subscribe/bulk", lambda: self._api.subscribe_bulk(clientid, pairs))

        async def registered() -> bool:
            if await self._api.subscribe_bulk(clientid, pairs):
                return True
            raise EmqxApiError(f"client {clientid} is not registered at the broker yet", 404)

        try:
            return await UNTIL_REGISTERED.call("subscribe/bulk", registered, sleep=pause)
        except EmqxApiError as exc:
            if exc.status == 404:
                return False
            raise

    async def replay(self, clientid: str, connection: str, flt: str,
                     settle: Callable[[Collection[str]], Awaitable[None]] | None = None,
                     current: Callable[[], bool] = lambda: True, given_back_only: bool = False,
                     first: Callable[[], Awaitable[None]] | None = None) -> Replayed:
        """Publish every stored message matching ``flt`` that this connection has
        not been given yet. ``given_back_only``: only what a failed replay of it gave
        back, if it did (a retry: what came since went to the client live). ``first``:
        store work owed before the claim (a mark reset), failing as the replay does.
        ``settle`` (given by a restore, whose subscription the broker may not have
        applied yet): a replay that reached nobody awaits it, then tries again
        (UNTIL_SUBSCRIBED). ``current``: False once the client has connected again;
        the replay then stops before its next batch (the new connection's restore
        replays what is left).
        A failure is logged, counted and answered as ``Replayed.failed``, so that a
        restore goes on with the client's other filters; only EMQX refusing the API key
        (the same for every filter) is raised."""
        progress = _Progress()
        try:
            if first is not None:
                await first()
            real = real_filter(flt)
            # (a failure before the claim gave nothing back: then the claim is still to make)
            # (the store's marks are past what was given back: nothing to claim for it)
            ranges = (self._take_given_back(connection, lambda topic: matches(real, topic))
                      if given_back_only else {}) or await self._claim(connection, real)
            if ranges:
                await self._deliver(connection, ranges, settle, current, progress)
        except Exception as exc:
            self._metrics.replay_failures.inc()
            if isinstance(exc, EmqxApiError) and exc.status in (401, 403):
                # the API key is refused: the same for every filter, so the whole job fails
                # with its one line (docs/operate.md: "client job failed")
                raise
            log.error("replay failed: %s", one_line(exc), extra={
                "event": "replay_failed", "clientid": clientid, "filter": flt, "messages": progress.delivered})
            return Replayed.gave_up(progress.published, progress.delivered, transient(exc))
        if not ranges:
            return Replayed(0, 0)
        self._log_outcome(clientid, flt, len(ranges), progress, current())
        return Replayed(progress.published, progress.delivered, progress.nobody)

    def _log_outcome(self, clientid: str, flt: str, topics: int, progress: _Progress, still_current: bool) -> None:
        if not still_current:
            log.info("replay stopped: the client connected again", extra={
                "event": "replay_superseded", "clientid": clientid, "filter": flt, "messages": progress.delivered})
        elif progress.nobody:
            log.info("replay stopped: no subscriber matched (client gone)",
                     extra={"event": "replay_stopped", "clientid": clientid, "filter": flt})
        if progress.delivered:
            log.info("replayed stored messages", extra={"event": "replay", "clientid": clientid, "filter": flt,
                                                        "messages": progress.delivered, "topics": topics})

    async def _deliver(self, connection: str, ranges: dict[str, tuple[float | None, float]],
                       settle: Callable[[Collection[str]], Awaitable[None]] | None,
                       current: Callable[[], bool], progress: _Progress) -> None:
        """Publish the claimed ``ranges``; on any failure (cancellation too) give back
        to the connection what was not delivered, so that a later replay sends it."""
        try:
            if settle is None:
                await self._publish_ranges(ranges, current, progress)
            else:
                await self._publish_once_subscribed(ranges, settle, current, progress)
        except BaseException:
            self._release(connection, ranges, progress.done)
            raise

    def _release(self, connection: str, ranges: dict[str, tuple[float | None, float]],
                 done: dict[str, float]) -> None:
        given_back = self._given_back.get(connection) or {}
        for topic, (low, high) in ranges.items():
            start = done.get(topic, low)
            if start is not None and start >= high:
                continue  # delivered in full
            if topic in given_back:
                earlier_start, earlier_high = given_back[topic]
                start, high = _lower(earlier_start, start), max(earlier_high, high)
            given_back[topic] = (start, high)
        if given_back:
            self._given_back.put(connection, given_back)

    async def _publish_once_subscribed(
        self, ranges: dict[str, tuple[float | None, float]],
        settle: Callable[[Collection[str]], Awaitable[None]], current: Callable[[], bool], progress: _Progress,
    ) -> None:
        async def attempt() -> None:
            progress.published = progress.delivered = 0
            progress.nobody = False
            progress.done.clear()  # the same range again: nothing of it was delivered
            await self._publish_ranges(ranges, current, progress)
            if progress.nobody and progress.delivered == 0 and current():
                # Nothing was delivered, so the same range can go again (a replay that
                # delivered some and then reached nobody stops there: the client left
                # meanwhile, and its next connect replays the rest). Its re-keys (the
                # broker's message.publish of what reached nobody) are queued: let them
                # land, so that the next read sees the ids the broker gave (if one is not
                # in the store in time, that message is replayed once more later).
                await settle(ranges.keys())
                raise NotSubscribedYet

        with contextlib.suppress(NotSubscribedYet):
            await self._until_subscribed.call("replay after a restore", attempt, sleep=sleep_outside_slot)

    async def _publish_ranges(self, ranges: dict[str, tuple[float | None, float]],
                              current: Callable[[], bool], progress: _Progress) -> None:
        """Publish the stored messages of ``ranges`` in order, until a batch reaches
        nobody or the client has connected again."""
        pages = self._store.read_messages(ranges, self._page_size)
        # closed however the loop ends, so its read-ahead task ends with it
        async with contextlib.aclosing(_prefetched_batches(pages, self._batch_size)) as batches:
            async for batch in batches:
                if not current():
                    break
                sendable = [m for m in batch if self._replayable(m)]
                result = await self._publish(sendable) if sendable else BulkResult(200, 0, 0)
                progress.add(batch, len(sendable), result)
                self._metrics.replayed.inc(result.delivered)
                if result.failed:
                    self._not_dispatched(batch, result)
                if result.delivered == 0 and result.unmatched > 0:
                    progress.nobody = True
                    break

    def _replayable(self, m: StoredMessage) -> bool:
        """Whether a stored message can be published: one EMQX would refuse (a qos
        outside 0-2, a topic no message can have: another writer of the store, a
        corrupted row) would make it refuse its whole batch. It is skipped, stays
        stored, is counted, and logged (one line a minute per reason)."""
        problem = "bad_qos" if m.qos not in (0, 1, 2) else topic_problem(m.topic)
        if problem is None:
            return True
        self._metrics.replay_messages_skipped.labels(problem).inc()
        if since := self._logs.note(problem):
            log.error("stored message not replayable (%s): skipped", problem, extra={
                "event": "replay_skipped", "msgid": m.msgid, "topic": m.topic[:200], "qos": m.qos,
                "skipped_since_last_line": since})
        return False

    def _not_dispatched(self, batch: list[StoredMessage], result: BulkResult) -> None:
        self._metrics.replay_messages_skipped.labels("not_dispatched").inc(result.failed)
        if since := self._logs.note("not_dispatched"):  # EMQX restarting: batch after batch
            log.warning("EMQX did not dispatch %d of %d replayed messages: they stay stored", result.failed,
                        len(batch), extra={"event": "replay_not_dispatched", "topic": batch[0].topic[:200],
                                           "status": result.status, "batches_since_last_line": since})

    def _take_given_back(self, connection: str, wanted: Callable[[str], bool]) -> dict[str, tuple[float | None, float]]:
        """The ranges a failed replay gave back to this connection for the ``wanted``
        topics, taken (the others stay given back)."""
        given_back = self._given_back.pop(connection) or {}
        taken = {topic: rng for topic, rng in given_back.items() if wanted(topic)}
        if rest := {topic: rng for topic, rng in given_back.items() if topic not in taken}:
            self._given_back.put(connection, rest)
        return taken

    async def _claim(self, connection: str, real: str) -> dict[str, tuple[float | None, float]]:
        if is_wildcard(real):
            found = await retrying("list stored topics",
                                   lambda: self._store.stored_topics(literal_prefix(real)))
            topics = [t for t in found if matches(real, t)]
        else:
            topics = [real]
        topics = [t for t in topics if self._tracked.match(t)]
        if not topics:
            return {}
        highs = await retrying("read latest positions", lambda: self._store.latest_positions(topics))
        if not highs:
            return {}
        previous = await retrying("claim replay", lambda: self._store.claim_replay(connection, highs))
        # a failed replay's claim on these topics: take that part back
        given_back = self._take_given_back(connection, lambda topic: topic in highs)
        ranges: dict[str, tuple[float | None, float]] = {}
        for topic, high in highs.items():
            low = previous.get(topic)
            if topic in given_back:
                low = _lower(low, given_back[topic][0])
            if low is None or low < high:
                ranges[topic] = (low, high)
        return ranges

    async def _publish(self, batch: list[StoredMessage]) -> BulkResult:
        """Publish one batch. EMQX answers 400 to the whole array for one item it
        refuses (publishing none of it): the batch is then cut in halves until that
        item is alone, which is skipped (counted, logged); the others go out in order."""
        items = [ReplayItem(m.topic, m.payload, m.qos, m.msgid) for m in batch]
        try:
            return await retrying("publish/bulk", lambda: self._publish_once(batch, items))
        except EmqxApiError as exc:
            if exc.status != 400:
                raise
            if len(batch) > 1:
                half = len(batch) // 2
                return await self._publish(batch[:half]) + await self._publish(batch[half:])
            self._metrics.replay_messages_skipped.labels("rejected").inc()
            log.error("EMQX refused a stored message: skipped: %s", exc, extra={
                "event": "replay_rejected", "msgid": batch[0].msgid, "topic": batch[0].topic[:200]})
            return BulkResult(400, 0, 0)

    async def _publish_once(self, batch: list[StoredMessage], items: list[ReplayItem]) -> BulkResult:
        """One publish/bulk call. A v2 broker hides the replay property, so the batch is
        registered as pending replays for exactly this call: EMQX runs every item's
        ``message.publish`` (on whichever instance) before it answers, so an entry left
        after the answer belongs to a hook call the broker gave up on, and would take an
        identical publish of someone else's for a replay (that message lost). A retry
        registers again: the entries its hook calls need were consumed or dropped."""
        pending = await self._register(batch) if self._flags.v2_seen else []
        try:
            return await self._api.publish_bulk(items)
        finally:
            if pending:
                await self._forget(pending)

    async def _register(self, batch: list[StoredMessage]) -> list[PendingReplay]:
        pending = [PendingReplay(m.topic, payload_digest(m.payload), m.msgid) for m in batch]
        await self._store.register_pending_replays(pending)
        self.local.add(pending)
        return pending

    async def _forget(self, pending: list[PendingReplay]) -> None:
        """Drop the call's entries once it is answered: from memory what its hook calls
        did not consume here, and from the store all of them, in one write (a hook call
        that recognised its replay in memory left the store's entry; one that reached
        another instance took it there, and dropping then removes an identical entry of
        a concurrent replay of the same message, if any, whose hook stores it once
        more: a duplicate, never a loss)."""
        self.local.discard(pending)
        drops = [DropPendingReplay(p.topic, p.digest, p.msgid) for p in pending]
        try:
            await retrying("drop pending replays", lambda: self._store.write(drops))
        except Exception as exc:  # they expire after PENDING_REPLAY_TTL_S
            log.warning("cannot drop %d pending replays from the store: %s", len(drops), exc)


async def _prefetched_batches(
    pages: AsyncIterator[list[StoredMessage]], batch_size: int
) -> AsyncGenerator[list[StoredMessage], None]:
    """Re-cut store pages into publish batches, reading the next page while the
    caller publishes the current one."""
    ahead: asyncio.Queue[list[StoredMessage] | None] = asyncio.Queue(maxsize=1)

    async def read() -> None:
        # The end marker goes only to a consumer still reading: once cancelled (the
        # consumer stopped early), a put into the full queue would wait forever.
        try:
            async for page in pages:
                if page:
                    await ahead.put(page)
        except Exception:
            await ahead.put(None)  # wakes the consumer, which then awaits the error
            raise
        await ahead.put(None)

    reader = asyncio.create_task(read())
    try:
        while (page := await ahead.get()) is not None:
            for start in range(0, len(page), batch_size):
                yield page[start : start + batch_size]
        await reader  # surfaces a read error
    finally:
        # the consumer stopped early (a break, an error, cancelled) or the read ended
        if not reader.done():
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        aclose = getattr(pages, "aclose", None)
        if aclose is not None:
            await aclose()


def _lower(a: float | None, b: float | None) -> float | None:
    """The lower of two range starts; None (from the oldest) is the lowest."""
    return None if a is None or b is None else min(a, b)
