"""Clients whose connect hooks the broker gave up on: found and restored anyway.

EMQX skips a hook call that fails (``failed_action = ignore``). In a reconnect storm
both connect hooks of a fresh session (``session.created`` and ``client.connected``)
can reach the gRPC server and wait there past EMQX's ``request_timeout``: grpc then
finds the call cancelled and never runs its handler, so that client would not get
its subscriptions back in this connection. grpc.aio still looks such a call's method
up (``GenericRpcHandler.service``) before it finds the request gone, so the service
can tell: the servicer hands grpc a handler of its own for each connect-hook call,
and a call whose handler has not started ``LOST_AFTER_S`` after the lookup is lost.

After a loss, :class:`MissedConnectSweep` asks EMQX's REST API for the sessions
created around that time that are connected and have no subscription, and restores
each through the client's own queue like a hook would, without resetting its replay
marks (a restore that did run for the connection, in any worker, has claimed what it
replayed: nothing is replayed twice). Cost: a small object and a closure per connect
hook call, and REST reads only after a loss.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable

from exhook.emqx_api import EmqxApi, EmqxApiError, ListedClient
from exhook.hooks import ClientRef
from exhook.metrics import Metrics
from exhook.replay import BrokerFlags
from storage.retry import Backoff

log = logging.getLogger(__name__)

# A call whose handler has not started this long after grpc took it from its queue is
# lost: that is past EMQX's default request_timeout (5 s) even had it been sent just
# before, so the broker has given up on it and carried on without the hook.
LOST_AFTER_S = 5.0
# The sweep asks for sessions created this long before the first lost call reached
# the application: the call waited in the broker and in grpc's queue first (at most
# EMQX's request_timeout), and the two hosts' clocks may differ a little.
LOOKBACK_S = 30.0
CHECK_EVERY_S = 1.0
PAGE_LIMIT = 1000
_CALLS_MAX = 100_000
_API_BACKOFF = Backoff(base=1.0, cap=30.0)


class ConnectCall:
    """One connect-hook call, from grpc's method lookup on."""

    __slots__ = ("at", "handled")

    def __init__(self, at: float) -> None:
        self.at = at
        self.handled = False


class ConnectCalls:
    """The connect-hook calls grpc has taken: a call whose handler has not started
    ``lost_after_s`` later is lost."""

    def __init__(self, lost_after_s: float = LOST_AFTER_S, clock: Callable[[], float] = time.monotonic) -> None:
        self._lost_after = lost_after_s
        self._clock = clock
        # in arrival order; bounded so that a loop that stopped checking cannot grow it
        self._calls: collections.deque[ConnectCall] = collections.deque(maxlen=_CALLS_MAX)

    def arrived(self) -> ConnectCall:
        call = ConnectCall(self._clock())
        self._calls.append(call)
        return call

    def take_lost(self) -> tuple[int, float]:
        """How many calls are lost, and how many seconds ago the oldest of them
        reached the application (0, 0.0 when none); they are forgotten."""
        now = self._clock()
        calls = self._calls
        count, oldest = 0, now
        while calls:
            call = calls[0]
            if not call.handled:
                if now - call.at <= self._lost_after:
                    break  # still waiting for its handler (the ones behind it are younger)
                count += 1
                oldest = min(oldest, call.at)
            calls.popleft()
        return count, now - oldest


# (the client, when its session was created in epoch seconds if known) -> queued?
RestoreMissed = Callable[[ClientRef, float | None], bool]


class MissedConnectSweep:
    """The loop that turns lost connect calls into restores (see the module doc)."""

    def __init__(self, calls: ConnectCalls, api: EmqxApi, restore: RestoreMissed, flags: BrokerFlags,
                 metrics: Metrics, wall: Callable[[], float] = time.time) -> None:
        self._calls = calls
        self._api = api
        self._restore = restore
        self._flags = flags
        self._metrics = metrics
        self._wall = wall
        # sessions created since this wall-clock time (ms) still need a sweep
        self._since_ms: int | None = None

    async def run(self) -> None:
        failures = 0
        while True:
            await asyncio.sleep(CHECK_EVERY_S if failures == 0 else _API_BACKOFF.delay(failures))
            self._note_losses()
            if self._since_ms is None:
                continue
            try:
                await self.sweep_once()
                failures = 0
            except EmqxApiError as exc:
                failures += 1
                log.warning("cannot list the broker's clients to restore those whose connect hooks were lost: %s",
                            exc, extra={"event": "missed_connect_sweep_failed", "failures": failures})

    def _note_losses(self) -> None:
        count, age_s = self._calls.take_lost()
        if not count:
            return
        self._metrics.connect_calls_lost.inc(count)
        since = int((self._wall() - age_s - LOOKBACK_S) * 1000)
        self._since_ms = since if self._since_ms is None else min(self._since_ms, since)
        log.warning("%d connect hook calls reached the service after the broker gave up on them", count,
                    extra={"event": "connect_calls_lost", "calls": count})

    def _client(self, listed: ListedClient) -> ClientRef:
        # the same connection key the client's hooks would have carried: EMQX 5.3 sends
        # no peer port in them, so its keys have 0 there
        port = listed.peerport if self._flags.peerports_seen else 0
        return ClientRef(listed.clientid, listed.node, listed.peerhost, port)

    async def sweep_once(self) -> None:
        """Restore every connected client whose session was created since the
        window's start and has no subscription; the window closes when done."""
        since = self._since_ms
        if since is None:
            return
        checked = queued = 0
        seen: set[str] = set()
        page, more = 1, True
        while more:
            sessions, more = await self._api.fresh_sessions(since, page, PAGE_LIMIT)
            for session in sessions:
                checked += 1
                if session.subscriptions or session.clientid in seen:
                    continue
                seen.add(session.clientid)
                if self._restore(self._client(session), session.created_at):
                    queued += 1
            page += 1
        self._since_ms = None
        self._metrics.missed_connect_restores.inc(queued)
        log.warning("checked %d fresh sessions for lost connect hooks, restoring %d", checked, queued,
                    extra={"event": "missed_connect_sweep", "sessions": checked, "restores": queued})
