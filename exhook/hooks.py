"""What the service does on each hook, independent of the proto package and the
backend.

``message_publish`` is the only hook whose answer the broker waits for and uses:
it returns once the message is durably stored, or at the publish deadline. Every
other hook also blocks its client in EMQX, so those return at once and hand their
work to the client's ordered background queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field

from exhook.client_queue import ClientQueues, outside_slot, sleep_outside_slot
from exhook.expiring import ExpiringMap
from exhook.held_rekeys import HeldRekeys
from exhook.later_retries import LaterRetries
from exhook.metrics import Metrics
from exhook.replay import BrokerFlags, Replayed, Replayer, payload_digest
from exhook.retry import UNTIL_STORED, transient
from exhook.subscribe_jobs import SubscribeBatch
from exhook.subscribed_calls import SubscribedCalls, Turn
from exhook.topics import TopicError, TopicSet, filter_key, real_filter
from exhook.writer import OrderedWriter, Outcome, WriterClosed
from storage.base import Store, WriteRejected
from storage.errors import one_line
from storage.model import DeleteMessage, RekeyMessage, SaveMessage, StoredMessage, WriteOp
from storage.ratelog import RateLimitedLog

log = logging.getLogger(__name__)

HTTP_API = "http_api"
HOOKS_CLIENT = ("session.created", "client.connected", "session.subscribed", "session.unsubscribed",
                "session.resumed")
HOOKS_MESSAGE = ("message.publish", "message.acked")
# session.created / session.resumed are followed by client.connected within the same
# connect, at most EMQX's request_timeout (5 s by default) later even when the first
# call timed out; an entry older than this belongs to a connect whose client.connected
# was lost. Kept short because EMQX 5.3 sends peerport 0: two connects of one client
# from one host then look like the same connection.
_CONNECT_TTL_S = 30.0
# what one connect's first hook leaves for its client.connected: one entry per client
# connecting right now, so this only has to hold a reconnect storm's worth
_CONNECT_ENTRIES = 100_000
# connections this process started a restore for, so that a sweep after late connect
# calls or a stall (missed_connects.py) does not restore them again: longer than the
# sweep's look-back plus the time it waits for the storm to end
_RESTORED_TTL_S = 120.0
# the unsubscribes noted per connection for a restore still to run (a client churning
# through filters must not grow it without end)
_DROPPED_PER_CONNECTION = 1000
# a client's latest connect is kept this long: a replay of an
# earlier connection still running then stops before its next batch
_CONNECTS_TTL_S = 600.0
# how long a restore session.created started waits for client.connected before it
# asks the broker anyway (then it retries a 404 for seconds: replay.UNTIL_REGISTERED);
# a client.connected that was lost costs its client this much delay (only its own:
# the job waits outside its slot of the client queues)
_REGISTER_WAIT_S = 1.0
# A publish that waits for a slow store goes to the spool this long before its
# deadline, so that the spool's fsync fits in (measured well under 5 ms here).
_SPILL_MARGIN_S = 0.05
# how long a restore waits for the broker's session.subscribed calls of the filters it
# gave back before it replays them anyway (subscribed_calls.py): they come a moment
# after subscribe/bulk (in a 2,000-client storm on a 2-core host the wait, with taking a
# slot again, was 69 ms at the median, 418 ms at p90, 470 ms at most), and a call that
# is lost costs its client only this delay (the wait needs no slot of the client queues)
SUBSCRIBED_WAIT_S = 2.0
# a restore's replay that reached nobody waits at most this long for the re-keys it
# caused to land before it reads the range again (a later read is only at least once)
_CAUGHT_UP_WAIT_S = 2.0


@dataclass(slots=True, eq=False)
class PendingRestore:
    """A restore session.created started, waiting for the client to be registered."""

    connection: str
    registered: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: bool = False
    started: bool = False  # past its wait: the client's subscriptions are being given back


@dataclass(slots=True)
class RestoreState:
    """How far a connect's restore got, kept across its later tries."""

    marks_reset: bool = False
    failures: int = 0


@dataclass(slots=True, frozen=True)
class ClientRef:
    clientid: str
    node: str = ""
    peerhost: str = ""
    peerport: int = 0

    @property
    def connection(self) -> str:
        """Identifies this network connection of the client (a reconnect gets a new
        peer port), so replay bookkeeping is per connection."""
        return f"{self.clientid}|{self.node}|{self.peerhost}|{self.peerport}"


class HookLogic:
    def __init__(
        self,
        tracked: TopicSet,
        store: Store,
        writer: OrderedWriter,
        replayer: Replayer,
        queues: ClientQueues,
        metrics: Metrics,
        flags: BrokerFlags,
        publish_deadline_ms: int,
        rekey_hold_s: float,
        subscribed_wait_s: float = SUBSCRIBED_WAIT_S,
    ) -> None:
        self.tracked = tracked
        self.flags = flags
        self._store = store
        self._writer = writer
        self._replayer = replayer
        self._queues = queues
        self._metrics = metrics
        self._deadline = publish_deadline_ms / 1000
        self._spill_at = self._deadline - min(_SPILL_MARGIN_S, self._deadline / 4)
        # clients whose session was resumed (no restore on client.connected)
        # clientid -> the connection whose session the broker kept (session.resumed)
        self._resumed: ExpiringMap[str, str] = ExpiringMap(_CONNECT_TTL_S, _CONNECT_ENTRIES)
        # clientid -> connection whose restore session.created already started
        self._restoring: ExpiringMap[str, PendingRestore] = ExpiringMap(_CONNECT_TTL_S, _CONNECT_ENTRIES)
        # connections whose restore a hook of this process started
        self._restore_started: ExpiringMap[str, bool] = ExpiringMap(_RESTORED_TTL_S, _CONNECT_ENTRIES)
        # connection -> {filter: qos} a hook's restore just read from the store and gave back,
        # until the broker's session.subscribed for each: that call need not store it again
        self._restored_subs: ExpiringMap[str, dict[str, int]] = ExpiringMap(_CONNECT_TTL_S, _CONNECT_ENTRIES)
        # the broker's session.subscribed calls a restore waits for, and the filters it covered
        self._subscribed_calls = SubscribedCalls(_CONNECT_TTL_S, _CONNECT_ENTRIES)
        self._subscribed_wait = subscribed_wait_s
        # clientid -> the number of its latest connect with a new session (session.created,
        # or a client.connected whose session.created was lost)
        self._connects: ExpiringMap[str, int] = ExpiringMap(_CONNECTS_TTL_S, _CONNECT_ENTRIES)
        self._connect_seq = itertools.count(1)
        # connection -> filters the client unsubscribed (and has not subscribed again):
        # a restore still to come must not give them back (kept as long as a storm can
        # hold a queued restore back, renewed at each unsubscribe)
        # connection -> the filters (filter_key) it unsubscribed from while a restore may run
        self._dropped: ExpiringMap[str, set[bytes]] = ExpiringMap(_RESTORED_TTL_S, _CONNECT_ENTRIES)
        self._deadline_logs = RateLimitedLog()
        self._store_wait_logs = RateLimitedLog()
        # clientid -> its latest connection (a resume too): a job tried again later for an
        # earlier one does not run (its marks and the broker's calls would not match)
        self._latest: ExpiringMap[str, ClientRef] = ExpiringMap(_CONNECTS_TTL_S, _CONNECT_ENTRIES)
        # connection -> the state of its restore that failed before it reset the replay
        # marks: the connection's next replay resets them first (else the restore, tried
        # again later, would reset them after that replay and send it all again)
        self._unreset: ExpiringMap[str, RestoreState] = ExpiringMap(_CONNECTS_TTL_S, _CONNECT_ENTRIES)
        # re-keys of this process's replays, held until their acks (held_rekeys.py)
        self.held_rekeys = HeldRekeys(self._submit_background, rekey_hold_s)
        # restores and replays an outage made fail, tried again later (a supervised loop runs it)
        self.later = LaterRetries(on_dropped=metrics.jobs_dropped.inc, on_change=metrics.jobs_retry_waiting.set)

    def hook_specs(self) -> list[tuple[str, tuple[str, ...]]]:
        """Hooks to register. No tracked topics means nothing to do: registering
        ``message.*`` with an empty list would make the broker send every message."""
        if not self.tracked:
            return []
        specs: list[tuple[str, tuple[str, ...]]] = [(name, ()) for name in HOOKS_CLIENT]
        specs += [(name, self.tracked.filters) for name in HOOKS_MESSAGE]
        return specs

    # -- message.publish ---------------------------------------------------------
    async def message_publish(
        self,
        msgid: str,
        sender: str,
        topic: str,
        qos: int,
        payload: bytes,
        timestamp: int,
        replay_of: str | None,
        *,
        from_rest: bool,
    ) -> None:
        """``from_rest``: published through EMQX's REST API (the servicer tells from the
        headers); only such a message can be a replay of ours."""
        skipped = self._skip_reason(topic, qos)
        if skipped is not None:
            self._metrics.skipped[skipped].inc()
            return
        started = time.monotonic()
        if from_rest:
            if replay_of is None and self.flags.v2_seen:
                replay_of = await self._pending_replay(topic, payload)
            if replay_of is not None:
                self._metrics.skipped["replay"].inc()
                if replay_of != msgid:
                    self.held_rekeys.hold(RekeyMessage(replay_of, msgid, topic))
                return
        message = StoredMessage(msgid, sender, topic, qos, False, payload, timestamp)
        await self._save(message, started)

    def _skip_reason(self, topic: str, qos: int) -> str | None:
        if qos == 0:
            return "qos0"
        if topic.startswith("$SYS/"):
            return "sys"
        # the broker only sends tracked topics (HookSpec filters); a broker that ignores them still gets this right
        if not self.tracked.match(topic):
            return "untracked"
        return None

    async def _pending_replay(self, topic: str, payload: bytes) -> str | None:
        """The original id if this REST publish is one of our v2 replays: from memory
        when this process published it (no round trip; the publish/bulk call drops its
        store entries once answered), else from the store."""
        digest = payload_digest(payload)
        orig = self._replayer.local.take(topic, digest)
        if orig is not None:
            return orig
        try:
            return await asyncio.wait_for(self._store.take_pending_replay(topic, digest), self._deadline / 2)
        except Exception as exc:  # store down: storing the replay again only costs a duplicate
            log.warning("cannot check the pending-replay registry (%s); storing %s", exc, topic)
            return None

    async def _save(self, message: StoredMessage, started: float) -> None:
        # Answering must not lose the message: if the store has not taken it by the
        # spill time, the writer puts it in the spool first (and then settles it).
        spill_in = max(0.0, self._spill_at - (time.monotonic() - started))
        try:
            entry = self._writer.submit(SaveMessage(message), source=message.sender, spill_in=spill_in)
        except WriterClosed:
            self._answer_unstored("spool_full", "shutting down: message NOT stored", message)
            return
        if not entry.settled and entry.done is not None:
            await entry.done
        outcome = entry.outcome
        if outcome is Outcome.STORED:
            self._metrics.messages_stored.inc()
        elif outcome is Outcome.SPOOLED:
            self._answer_unstored("store_slow", "store slower than publish_deadline: message spooled", message)
        elif outcome is Outcome.REJECTED:
            pass  # set aside, logged and counted by the writer
        else:
            self._answer_unstored("spool_full", "spool full or failing: message NOT stored", message)

    def _answer_unstored(self, reason: str, text: str, message: StoredMessage) -> None:
        self._metrics.deadline[reason].inc()
        count = self._deadline_logs.note(reason)  # each reason its own line: first, then one a minute
        if count:
            log.warning(text, extra={"event": "publish_deadline", "reason": reason, "msgid": message.msgid,
                                     "topic": message.topic[:200], "answers_since_last_line": count})

    # -- message.acked -----------------------------------------------------------
    def message_acked(self, msgid: str, topic: str, subscriber: str = "", *, from_rest: bool) -> None:
        """``from_rest``: the acked message was published through EMQX's REST API (a
        replay of ours, or an application's own REST publish)."""
        if not self.tracked.match(topic):
            return
        self._metrics.acks.inc()
        if from_rest and (stored_as := self.held_rekeys.acked(msgid)) is not None:
            # the replay's re-key never left this process: delete the copy where it is
            self._metrics.rekeys_merged.inc()
            self._submit_background(DeleteMessage(stored_as, topic), subscriber)
            return
        self._submit_background(DeleteMessage(msgid, topic, replay_ack=from_rest), subscriber)

    def _submit_background(self, op: WriteOp, source: str = HTTP_API) -> None:
        """Queue a write nobody waits for (the writer never blocks: it spools);
        ``source``: the client it came from (re-keys come from the broker's REST API)."""
        try:
            self._writer.submit(op, source)
        except WriterClosed:
            self._metrics.writes_dropped.inc()

    # -- client and session hooks --------------------------------------------------
    # A fresh session needs its stored subscriptions back. EMQX fires session.created
    # and then client.connected for it, and skips a hook call that fails (a storm's
    # CANCELLED): restoring from whichever of the two arrives first, once, means one
    # lost call no longer leaves the client without its subscriptions.
    def session_created(self, client: ClientRef) -> None:
        self._queues.note_connect()
        self._latest.put(client.clientid, client)
        self._count_connect(client.clientid)
        self._forget_connection(client)  # an earlier connection's, with the same key (EMQX 5.3)
        self._cancel_restore(client.clientid)  # left by an earlier connect whose client.connected was lost
        self._resumed.pop(client.clientid)
        pending = PendingRestore(client.connection)
        if self._submit_restore(client, pending):
            self._restoring.put(client.clientid, pending)

    def session_resumed(self, client: ClientRef) -> None:
        # not a new connect for a running replay: the broker kept the session, so what
        # the replay still publishes reaches it, and nothing else would replay the rest
        self._queues.note_connect()
        self._latest.put(client.clientid, client)
        self._forget_connection(client)
        earlier = self._cancel_restore(client.clientid)  # left by a connect whose client.connected was lost
        if earlier is not None and not earlier.started:
            # A resume needs a kept session, and that connect's session.created made it
            # (its clean start dropped any older one): the session resumed here never got
            # its subscriptions back. Its restore is this connection's to do now.
            pending = PendingRestore(client.connection)
            if self._submit_restore(client, pending):
                self._restoring.put(client.clientid, pending)
            return
        self._resumed.put(client.clientid, client.connection)

    def client_connected(self, client: ClientRef) -> None:
        self._queues.note_connect()
        self._latest.put(client.clientid, client)
        if self._resumed.pop(client.clientid) == client.connection:
            # The broker kept this session's subscriptions and queued its messages;
            # re-subscribing would replay duplicates of what it delivers itself. (A
            # resume of an earlier connection whose client.connected was lost does not
            # speak for this one.)
            return
        pending = self._restoring.pop(client.clientid)
        if pending is not None:
            pending.registered.set()  # the client is registered now: its restore may go ahead
            if pending.connection == client.connection:
                return  # session.created of this connect started the restore
        self._count_connect(client.clientid)  # this connect's session.created was lost
        self._forget_connection(client)
        self._submit_restore(client, None)

    def _forget_connection(self, client: ClientRef) -> None:
        """What hooks of an earlier connection with the same key left (EMQX 5.3 sends no
        peer port, so a reconnect from one host has the same key)."""
        self._restored_subs.pop(client.connection)
        self._subscribed_calls.forget(client.connection)
        self._unreset.pop(client.connection)  # this connect's own restore resets (a resume keeps them)

    def _count_connect(self, clientid: str) -> None:
        # one sequence for all clients: a client whose entry expired or was evicted
        # never gets back a value a job took before
        self._connects.put(clientid, next(self._connect_seq))

    def _same_connect(self, clientid: str) -> Callable[[], bool]:
        """Whether no later connect of ``clientid`` with a new session has begun since
        now (taken when a job is queued). A replay publishes to the topic, so one still
        running for an earlier connection would reach the new one ahead of, and again
        after, that one's own restore: it stops before its next batch instead."""
        connect = self._connects.get(clientid)
        return lambda: self._connects.get(clientid) in (connect, None)

    def _cancel_restore(self, clientid: str) -> PendingRestore | None:
        """Cancel the restore an earlier connect's session.created queued, if it is
        still waiting for its client.connected; returns it."""
        pending = self._restoring.pop(clientid)
        if pending is not None:
            pending.cancelled = True
            pending.registered.set()
        return pending

    def restore_missed(self, client: ClientRef) -> bool:
        """Re-subscribe a client whose connect hooks never reached a handler (the sweep
        of ``missed_connects.py`` found it connected without subscriptions); False if
        this process restores that connection already or the job was refused.

        Only the subscriptions: the broker then fires ``session.subscribed`` for each
        filter to the worker that owns the client's calls, whose job replays it after
        any restore its own hooks queued. Replaying here, from another worker, could
        run before that restore, whose mark reset would then replay everything again.
        The replay marks are kept for the same reason."""
        if self._restore_started.get(client.connection) is not None:
            return False
        return self._queues.submit(client.clientid, "restore subscriptions (connect hooks lost)",
                                   lambda: self._resubscribe(client))

    async def _resubscribe(self, client: ClientRef) -> None:
        # not noted in _restored_subs: the broker's session.subscribed for these may go to
        # another worker, and an entry nobody consumes must not outlive what it describes
        await self._replayer.restore(client.clientid)  # the marks are kept

    def _submit_restore(self, client: ClientRef, pending: PendingRestore | None) -> bool:
        current = self._same_connect(client.clientid)
        submitted = self._queues.submit(client.clientid, "restore subscriptions",
                                        lambda: self._restore(client, pending, current))
        if submitted:
            self._restore_started.put(client.connection, True)
        return submitted

    async def _restore(self, client: ClientRef, pending: PendingRestore | None,
                       current: Callable[[], bool], state: RestoreState | None = None) -> None:
        if state is None:
            state = RestoreState()
        elif not self._still_connected(client, current):
            return  # tried again later, and the client has connected again: it restores at that connect
        if pending is not None:
            # Started by session.created: EMQX registers the client only after it, and
            # in a storm that can take seconds; client.connected says it is done (if
            # that call is lost, ask anyway after a moment, retrying a 404 for a while).
            # The wait needs no slot: other clients' jobs run meanwhile. (Usually it is
            # over before the job starts: stepping out would only send the job to the
            # back of the line.)
            if not pending.registered.is_set():
                async with outside_slot():
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(_REGISTER_WAIT_S):
                            await pending.registered.wait()
            if pending.cancelled:
                return  # the client connected again meanwhile: that connect restores it
            pending.started = True
        try:
            # the marks are reset once: a later try must not replay again what one replayed since
            stored = await self._replayer.stored_subscriptions(
                client.clientid, reset_marks_of=None if state.marks_reset else client.connection)
            state.marks_reset = True
            async with self._subscribed_calls.turn() as turn:
                restored = await self._replayer.restore(client.clientid, wait_for_client=pending is not None,
                                                        keep=lambda topic: not self._was_dropped(client, topic),
                                                        stored=stored, pause=turn.sleep)
                self._restored_subs.put(client.connection, dict(restored))
                filters = [topic for topic, _ in restored]
                arrived = await self._calls_arrived(client, filters, turn)
        except Exception as exc:
            if not state.marks_reset:
                self._unreset.put(client.connection, state)
            if transient(exc):
                state.failures += 1
                self.later.schedule(("restore", client.connection), state.failures, "restore",
                                    lambda: self._restore_again(client, current, state))
            raise  # the client's queue logs it
        await self._replay_restored(client, filters, arrived, current)

    async def _calls_arrived(self, client: ClientRef, filters: list[str], turn: Turn) -> set[str]:
        """The restored ``filters`` whose session.subscribed call has reached this
        process, after waiting a moment for the others.

        The broker fires session.subscribed for each restored filter once the route
        exists, but in a storm the call can time out and the broker carries on without
        it: the restore replays each filter itself, after waiting a moment for that call
        (subscribed_calls.py). A filter replayed in full after its call arrived, with
        every answered message in the store, is covered: that call's job (the client's
        queue runs it after this) skips its replay. Otherwise that job replays too and
        the replay marks make it send nothing twice. A replay that reaches nobody (the
        call was lost and the broker has not applied the subscription yet) tries again
        once the writer has caught up (Replayer.replay)."""
        missing = self._subscribed_calls.missing(client.connection, filters)
        if missing:
            async with outside_slot():
                missing = await self._subscribed_calls.wait(client.connection, filters, self._subscribed_wait)
                turn.release()  # the restore's turn ends with this wait, before it waits for a slot
        return set(filters).difference(missing)

    async def _replay_restored(self, client: ClientRef, filters: list[str], arrived: set[str],
                               current: Callable[[], bool]) -> None:
        settle: Callable[[Collection[str]], Awaitable[None]] | None = self._writer_caught_up
        for topic in filters:
            # a message answered from the spool (a slow store) and not drained yet is
            # outside this replay's range: the call's job must read again then
            all_stored = not self._writer.spooling
            replayed = await self._replay_filter(client, topic, current, settle)
            if replayed.reached_nobody:
                settle = None  # the client left: its other filters do not wait for it again
            elif topic in arrived and all_stored and replayed.delivered == replayed.published:
                self._subscribed_calls.cover(client.connection, topic)

    def _still_connected(self, client: ClientRef, current: Callable[[], bool]) -> bool:
        """No later connect of the client since ``current`` was taken, with a new
        session or a resumed one."""
        latest = self._latest.get(client.clientid)
        return current() and (latest is None or latest.connection == client.connection)

    def _restore_again(self, client: ClientRef, current: Callable[[], bool], state: RestoreState) -> None:
        latest = self._latest.get(client.clientid)
        if current() and latest is not None and latest.connection != client.connection:
            # The client resumed the session this restore was for, on another connection:
            # restore that one (the broker's calls come with its key). Its marks are its
            # own jobs': not reset, so what they replayed is not sent twice.
            client, state = latest, RestoreState(marks_reset=True, failures=state.failures)
            self._restore_started.put(client.connection, True)
        self._queues.submit(client.clientid, "restore subscriptions (again)",
                            lambda: self._restore(client, None, current, state))

    async def _writer_caught_up(self, topics: Collection[str]) -> None:
        self.held_rekeys.flush(topics)  # these topics are read again: their re-keys must be in the store
        # only a wait (up to 2 s, all of it while the writer spools): others may use the slot
        async with outside_slot():
            await self._writer.caught_up(_CAUGHT_UP_WAIT_S)

    def session_subscribed(self, client: ClientRef, topic: str, qos: int) -> None:
        if (dropped := self._dropped.get(client.connection)) is not None:
            dropped.discard(filter_key(topic))  # subscribed again: a restore may give it back
        submitted = self._queue_filter_job(client, topic, qos)
        if submitted and self._restore_started.get(client.connection) is not None:
            # the route exists now (noted only with its job queued: that job is what
            # consumes a covered filter)
            self._subscribed_calls.arrived(client.connection, topic)

    def _queue_filter_job(self, client: ClientRef, topic: str, qos: int | None) -> bool:
        """A subscribe (``qos`` None: an unsubscribe) into the client's last queued batch if
        it can take it, else a new batch (subscribe_jobs.py). False if the client's queue
        refused it."""
        connect = self._connects.get(client.clientid)

        def join(job: object) -> bool:
            return isinstance(job, SubscribeBatch) and job.take(client.connection, connect, topic, qos)

        if self._queues.merge_into_last(client.clientid, join):
            return True
        current = self._same_connect(client.clientid)

        def run(t: str, q: int | None) -> Awaitable[None]:
            return self._subscribed(client, t, q, current) if q is not None else self._unsubscribed(client, t)

        batch = SubscribeBatch(client.clientid, client.connection, connect, run)
        batch.take(client.connection, connect, topic, qos)
        return self._queues.submit(client.clientid, f"{'subscribe' if qos is not None else 'unsubscribe'} {topic}",
                                   batch)

    async def _subscribed(self, client: ClientRef, topic: str, qos: int, current: Callable[[], bool]) -> None:
        if self._take_restored(client, topic) != qos:  # else it is stored as it is
            await self._save_subscription(client, topic, qos)
        if not self._subscribed_calls.take_covered(client.connection, topic):
            await self._replay_filter(client, topic, current)

    def _was_dropped(self, client: ClientRef, topic: str) -> bool:
        return filter_key(topic) in (self._dropped.get(client.connection) or ())

    def _take_restored(self, client: ClientRef, topic: str) -> int | None:
        """The qos a restore of this connection gave ``topic`` back with, forgotten now
        (None if it did not)."""
        restored = self._restored_subs.get(client.connection)
        return None if restored is None else restored.pop(topic, None)

    async def _save_subscription(self, client: ClientRef, topic: str, qos: int) -> None:
        try:
            await self._write_subscription("save subscription",
                                           lambda: self._store.save_subscription(client.clientid, topic, qos))
        except WriteRejected as exc:
            # the store cannot hold this subscription (e.g. a clientid longer than its
            # column): it will not be restored on a later connect, but the client
            # still gets its stored messages now
            self._metrics.write_rejected(self._store.name, exc.reason)
            log.error("subscription not stored: %s", exc.detail, extra={
                "event": "subscription_rejected", "clientid": client.clientid[:200], "topic": topic[:200],
                "reason": exc.reason})

    async def _replay_filter(self, client: ClientRef, topic: str, current: Callable[[], bool],
                             settle: Callable[[Collection[str]], Awaitable[None]] | None = None,
                             failures: int = 0) -> Replayed:
        """Replay ``topic`` to this connection; one an outage made fail is tried again
        later while the client has not connected again (what it did not deliver was
        given back to the connection, so a later try sends only that)."""
        try:
            real = real_filter(topic)
        except TopicError as exc:
            log.warning("client %s: not replaying %s: %s", client.clientid, topic, exc)
            return Replayed(0, 0)
        if not self.tracked.overlaps(real):
            return Replayed(0, 0)
        replayed = await self._replayer.replay(client.clientid, client.connection, topic, settle, current,
                                               given_back_only=failures > 0,
                                               first=lambda: self._reset_marks_owed(client))
        if replayed.failed and replayed.retryable and self._still_connected(client, current):
            self.later.schedule(("replay", client.connection, topic), failures + 1, "replay",
                                lambda: self._replay_again(client, topic, current, failures + 1))
        return replayed

    async def _reset_marks_owed(self, client: ClientRef) -> None:
        """Reset this connection's replay marks if its restore failed before it could."""
        state = self._unreset.pop(client.connection)
        if state is None or state.marks_reset:
            return
        try:
            await self._replayer.reset_marks(client.connection)
        except BaseException:
            self._unreset.put(client.connection, state)
            raise
        state.marks_reset = True

    def _replay_again(self, client: ClientRef, topic: str, current: Callable[[], bool], failures: int) -> None:
        async def job() -> None:
            # not when the client connected again (its new connect replays it) nor when it
            # dropped the filter (the part given back waits for its next subscribe of it)
            if self._still_connected(client, current) and not self._was_dropped(client, topic):
                await self._replay_filter(client, topic, current, failures=failures)

        self._queues.submit(client.clientid, f"replay {topic} (again)", job)

    def session_unsubscribed(self, client: ClientRef, topic: str) -> None:
        # noted at once: a restore of this connection may be waiting to run (its read
        # of the store could still find the filter, its subscribe would undo this)
        dropped = self._dropped.get(client.connection) or set()
        if len(dropped) < _DROPPED_PER_CONNECTION:
            dropped.add(filter_key(topic))
        self._dropped.put(client.connection, dropped)
        self._queue_filter_job(client, topic, None)

    async def _unsubscribed(self, client: ClientRef, topic: str) -> None:
        # here, not in the hook: a restore queued before this job notes what it gave back
        # when it has run, and a subscribe after this one must be stored again
        self._take_restored(client, topic)
        await self._write_subscription("delete subscription",
                                       lambda: self._store.delete_subscription(client.clientid, topic))

    async def _write_subscription(self, what: str, write: Callable[[], Awaitable[None]]) -> None:
        """``write``, tried again while the store fails (``UNTIL_STORED``; one line a
        minute says so). The client's later jobs wait behind it, in order; other
        clients' jobs run meanwhile (the pauses are taken outside the slot)."""
        async def attempt() -> None:
            try:
                await write()
            except Exception as exc:
                if transient(exc) and (since := self._store_wait_logs.note(what)):
                    log.warning("%s waits for the store, tried again until it works: %s", what, one_line(exc),
                                extra={"event": "subscription_write_waits", "operation": what,
                                       "waits_since_last_line": since})
                raise

        await UNTIL_STORED.call(what, attempt, sleep=sleep_outside_slot)
