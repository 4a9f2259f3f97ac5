"""Clients whose connect hooks the broker gave up on: found and restored anyway.

EMQX skips a hook call that fails (``failed_action = ignore``). In a reconnect storm
both connect hooks of a fresh session (``session.created`` and ``client.connected``)
can reach the gRPC server and wait there past EMQX's ``request_timeout``: grpc then
finds the call cancelled and never runs its handler, so that client would not get
its subscriptions back in this connection. grpc.aio still looks such a call's method
up (``GenericRpcHandler.service``) before it finds the request gone, so the service
can tell: the servicer hands grpc a request decoder of its own for each connect-hook
call, and a call whose request has not been read twice EMQX's hook timeout after the
lookup is lost (``lost_after_s``).

After losses of both hooks, once the storm is over here, :class:`MissedConnectSweep`
asks EMQX's REST API for the sessions created around that time that are connected
and have no subscription, and re-subscribes each through the client's own queue. The
broker then fires ``session.subscribed`` for each filter to the worker that owns the
client's calls, whose job replays it (``HookLogic.restore_missed`` says why the
replay is left to it). Only with peer ports (EMQX 5.4+): without them a connection's
key repeats at every connect of the client.
Cost: a small object and a closure per connect hook call (under 1 µs), and REST
reads only after a loss.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable

from exhook.emqx_api import EmqxApi, EmqxApiError
from exhook.hooks import ClientRef
from exhook.metrics import HOOK_OF_RPC, Metrics
from exhook.ratelog import RateLimitedLog
from exhook.replay import BrokerFlags
from storage.retry import Backoff

log = logging.getLogger(__name__)

# A call whose request grpc has not read this long after it took the call from its
# queue is lost: twice EMQX's request_timeout (exhook.emqx.hook_timeout), so the broker
# has given up on it and carried on without the hook, and a handler that starts late on
# a saturated loop is not taken for a lost call (its restore would race the sweep's).
LOST_AFTER_TIMEOUTS = 2
# The sweep asks for sessions created this long before the first lost call reached
# the application: the call waited in the broker and in grpc's queue first (at most
# EMQX's request_timeout), and the two hosts' clocks may differ a little.
LOOKBACK_S = 30.0
# the calls that hold a fresh session's restore
CONNECT_RPCS = frozenset({"OnSessionCreated", "OnClientConnected"})
CHECK_EVERY_S = 1.0
# A sweep waits until the storm is over here (no connect call for this long, no
# background job waiting for a slot) so that the hooks' own restores, which the pacing
# holds back during a storm, have started and the sweep finds only the clients nobody
# restores; a fleet that never stops connecting gets its sweep this long after the
# loss anyway.
QUIET_S = 2.0
SETTLE_MAX_S = 30.0
PAGE_LIMIT = 1000
_CALLS_MAX = 100_000
_API_BACKOFF = Backoff(base=1.0, cap=30.0)


class ConnectCall:
    """One connect-hook call, from grpc's method lookup on."""

    __slots__ = ("rpc", "at", "handled")

    def __init__(self, rpc: str, at: float) -> None:
        self.rpc = rpc
        self.at = at
        self.handled = False


class ConnectCalls:
    """The connect-hook calls grpc has taken: a call whose request has not been read
    ``lost_after_s`` later is lost (``handled`` is set when it is read)."""

    def __init__(self, lost_after_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._lost_after = lost_after_s
        self._clock = clock
        # in arrival order; bounded so that a loop that stopped checking cannot grow it
        self._calls: collections.deque[ConnectCall] = collections.deque(maxlen=_CALLS_MAX)
        self._last_arrival = float("-inf")

    @classmethod
    def for_hook_timeout(cls, hook_timeout_ms: int) -> ConnectCalls:
        """Calls lost after ``LOST_AFTER_TIMEOUTS`` times the broker's hook timeout."""
        return cls(lost_after_s=LOST_AFTER_TIMEOUTS * hook_timeout_ms / 1000)

    def arrived(self, rpc: str) -> ConnectCall:
        call = ConnectCall(rpc, self._clock())
        self._calls.append(call)
        self._last_arrival = call.at
        return call

    def quiet_for(self, seconds: float) -> bool:
        """Has no connect call arrived for ``seconds``?"""
        return self._clock() - self._last_arrival >= seconds

    def waiting(self) -> bool:
        """Is a call not yet counted lost still waiting to be read?"""
        return any(not call.handled for call in self._calls)

    def take_lost(self) -> list[tuple[str, float]]:
        """The lost calls, as (rpc, seconds since grpc took it); they are forgotten."""
        now = self._clock()
        calls = self._calls
        lost = []
        while calls:
            call = calls[0]
            if not call.handled:
                if now - call.at <= self._lost_after:
                    break  # still waiting for its handler (the ones behind it are younger)
                lost.append((call.rpc, now - call.at))
            calls.popleft()
        return lost


RestoreMissed = Callable[[ClientRef], bool]


class MissedConnectSweep:
    """The loop that turns lost connect calls into restores (see the module doc)."""

    def __init__(self, calls: ConnectCalls, api: EmqxApi, restore: RestoreMissed, flags: BrokerFlags,
                 metrics: Metrics, busy: Callable[[], bool], wall: Callable[[], float] = time.time,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._calls = calls
        self._api = api
        self._restore = restore
        self._flags = flags
        self._metrics = metrics
        self._busy = busy
        self._wall = wall
        self._clock = clock
        # rpc -> when (epoch s) its latest lost call reached the service
        self._last_loss: dict[str, float] = {}
        # the earliest window start (epoch ms) of the losses no sweep has covered yet
        self._window_ms: int | None = None
        # monotonic: when a sweep became owed (both hooks lost calls); the window is
        # kept from then on until a sweep covers it
        self._owed_at: float | None = None
        # a storm loses calls every second: one line a minute says how many
        self._loss_log = RateLimitedLog()
        self._unlogged = 0

    def pending_since(self) -> int | None:
        """The start (epoch ms) of the window a sweep owes, or None."""
        return None if self._owed_at is None else self._window_ms

    def note_losses(self) -> None:
        """Take the calls lost since the last look. A client goes unrestored only when
        both of its connect calls are lost, and EMQX sends both over the one gRPC
        connection its clientid hashes to, so to this worker: a sweep is owed once both
        hooks lost calls within the look-back of each other."""
        wall = self._wall()
        lost = self._calls.take_lost()
        for rpc, age_s in lost:
            at = wall - age_s
            self._metrics.connect_call_lost(HOOK_OF_RPC[rpc])
            self._last_loss[rpc] = max(self._last_loss.get(rpc, at), at)
            start = int((at - LOOKBACK_S) * 1000)
            self._window_ms = start if self._window_ms is None else min(self._window_ms, start)
        self._unlogged += len(lost)
        if lost and self._loss_log.note():
            log.warning("%d connect hook calls reached the service after the broker gave up on them",
                        self._unlogged, extra={"event": "connect_calls_lost", "calls": self._unlogged})
            self._unlogged = 0
        if self._owed_at is None:
            # a loss of one hook this long ago cannot pair with a later one of the other
            self._last_loss = {rpc: at for rpc, at in self._last_loss.items() if wall - at <= LOOKBACK_S}
            if not self._last_loss:
                self._window_ms = None
            elif len(self._last_loss) == len(CONNECT_RPCS):
                self._owed_at = self._clock()

    def due(self) -> bool:
        """Is a sweep owed, and is the storm over here (no connect call for a while,
        none waiting for its handler, no background job waiting for a slot), or has it
        waited long enough?"""
        if self._owed_at is None:
            return False
        settled = self._calls.quiet_for(QUIET_S) and not self._calls.waiting() and not self._busy()
        return settled or self._clock() - self._owed_at >= SETTLE_MAX_S

    async def run(self) -> None:
        failures = 0
        while True:
            await asyncio.sleep(CHECK_EVERY_S if failures == 0 else _API_BACKOFF.delay(failures))
            self.note_losses()
            if not self.due():
                continue
            try:
                await self.sweep_once()
                failures = 0
            except EmqxApiError as exc:  # the owed window stays for the next try
                failures += 1
                log.warning("cannot list the broker's clients to restore those whose connect hooks were lost: %s",
                            exc, extra={"event": "missed_connect_sweep_failed", "failures": failures})

    async def sweep_once(self) -> None:
        """Restore every connected client whose session was created since the owed
        window's start and has no subscription; the window is settled when done."""
        since = self.pending_since()
        if since is None:
            return
        if not self._flags.peerports_seen:
            # EMQX 5.3 sends no peer port: a connection's key is the same at every connect
            # of the client, and a restore from here could not keep the hooks' replay
            # marks apart from an earlier connection's. Those clients get their
            # subscriptions back at their next connect.
            self._settle()
            log.warning("connect hook calls were lost, but this broker sends no peer port (EMQX 5.3): clients "
                        "that lost both are restored at their next connect", extra={"event": "missed_connect_sweep",
                                                                                   "sessions": 0, "restores": 0})
            return
        checked = queued = 0
        seen: set[str] = set()
        page, more = 1, True
        while more:
            listed, more = await self._api.fresh_sessions(since, page, PAGE_LIMIT)
            for client in listed:
                checked += 1
                if client.subscriptions or client.clientid in seen:
                    continue
                seen.add(client.clientid)
                if self._restore(ClientRef(client.clientid, client.node, client.peerhost, client.peerport)):
                    queued += 1
            page += 1
        self._settle()
        self._metrics.missed_connect_restores.inc(queued)
        log.warning("checked %d fresh sessions for lost connect hooks, restoring %d", checked, queued,
                    extra={"event": "missed_connect_sweep", "sessions": checked, "restores": queued})

    def _settle(self) -> None:
        self._owed_at = self._window_ms = None
        self._last_loss.clear()
