"""Clients whose connect hooks the broker may have given up on: found and restored anyway.

EMQX skips a hook call that fails (``failed_action = ignore``). In a reconnect storm
both connect hooks of a fresh session (``session.created`` and ``client.connected``)
can wait in the service's gRPC server past EMQX's ``request_timeout``: grpc then drops
the call without running any Python code, and that client would not get its
subscriptions back in this connection. The service cannot see a dropped call, but it
can see the only two ways one gets dropped (:class:`ConnectRisk`):

- *Late calls.* EMQX sends every call's timeout (grpc's ``grpc-timeout`` header), and
  grpc hands calls to the application one at a time, in arrival order. If a call
  expired while the service kept taking calls, the calls taken just before it expired
  had little of their own deadline left: a connect call that reaches its handler with
  less than half the hook timeout left is counted late.
- *Stalls.* If the event loop did not run for a while (a long callback, the process
  stopped or starved of CPU), calls may have expired without any call taken meanwhile.
  A ticker that wakes a quarter of the hook timeout late or more counts a stall (it
  ticks every eighth, so a loop that did not run for three eighths is always counted).

A client goes unrestored only when both of its connect calls are dropped, and EMQX
sends both over the one gRPC connection its clientid hashes to, so to this worker: a
sweep is owed after late calls of both hooks within the look-back of each other, or
after a stall. Once the storm is over here, :class:`MissedConnectSweep` asks EMQX's
REST API for the sessions created around that time that are connected and have no
subscription, and re-subscribes each through the client's own queue. The broker then
fires ``session.subscribed`` for each filter to the worker that owns the client's
calls, whose job replays it (``HookLogic.restore_missed`` says why the replay is left
to it). Only on nodes that send peer ports (EMQX 5.4+): without them a connection's key
repeats at every connect of the client.

Cost: reading the clock and the call's deadline per connect call (under 1 µs), a
timer a few times a second, and REST reads only after a suspicion. A false alarm
(late calls that were all served) costs only those reads: the sweep skips every
client with subscriptions and every connection this process restores already.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from exhook.emqx_api import EmqxApi, EmqxApiError
from exhook.hooks import ClientRef
from exhook.metrics import HOOK_OF_RPC, Metrics
from exhook.replay import BrokerFlags
from storage.ratelog import RateLimitedLog
from storage.retry import Backoff

log = logging.getLogger(__name__)

# A connect call that reaches its handler with less than this share of EMQX's
# request_timeout (exhook.emqx.hook_timeout) left is late: calls behind it in grpc's
# queue may have expired (see the module doc).
LATE_BELOW = 0.5
# The ticker waking this share of the hook timeout late is a stall. It ticks every
# eighth of the timeout, so the loop not running for three eighths is always counted
# (a quarter may be): less than the half a late call has left, so a gap in grpc's
# taking of calls long enough to let one expire unnoticed is seen by one or the other.
STALL_AFTER = 0.25
# The sweep asks for sessions created this long before the first suspicion: a dropped
# call waited in the broker and in grpc's queue first (at most EMQX's request_timeout),
# and the two hosts' clocks may differ a little.
LOOKBACK_S = 30.0
# the calls that hold a fresh session's restore
SESSION_CREATED, CLIENT_CONNECTED = "OnSessionCreated", "OnClientConnected"
CONNECT_RPCS = frozenset({SESSION_CREATED, CLIENT_CONNECTED})
STALL = "stall"
CHECK_EVERY_S = 1.0
# A sweep waits until the storm is over here (no connect call for this long, no
# background job waiting for a slot) so that the hooks' own restores, which the pacing
# holds back during a storm, have started and the sweep finds only the clients nobody
# restores; a fleet that never stops connecting gets its sweep this long after the
# suspicion anyway.
QUIET_S = 2.0
SETTLE_MAX_S = 30.0
PAGE_LIMIT = 1000
# A broker (or a proxy) that says "hasnext" for ever must not keep the sweep paging:
# 1,000 pages of 1,000 are more fresh sessions than any one sweep window holds.
MAX_PAGES = 1000
_API_BACKOFF = Backoff(base=1.0, cap=30.0)


@dataclass(slots=True)
class Suspicions:
    """One kind of suspicion (a connect rpc's late calls, or stalls) since the last look."""

    first: float  # monotonic s
    last: float
    count: int = 1


class ConnectRisk:
    """Late connect calls and event-loop stalls: the signs that the broker may have
    given up on connect calls grpc then dropped (see the module doc)."""

    def __init__(self, hook_timeout_s: float, metrics: Metrics, clock: Callable[[], float] = time.monotonic) -> None:
        self._late_below = LATE_BELOW * hook_timeout_s
        self._stall_after = STALL_AFTER * hook_timeout_s
        self._tick = self._stall_after / 2
        self._clock = clock
        self._late_calls = {rpc: metrics.connect_calls_late.labels(HOOK_OF_RPC[rpc]) for rpc in CONNECT_RPCS}
        self._stalls = metrics.loop_stalls
        self._last_start = -math.inf
        self._seen: dict[str, Suspicions] = {}

    @classmethod
    def for_hook_timeout(cls, hook_timeout_ms: int, metrics: Metrics) -> ConnectRisk:
        return cls(hook_timeout_ms / 1000, metrics)

    def started(self, rpc: str, remaining_s: float | None) -> None:
        """A connect call reached its handler with ``remaining_s`` of its deadline left
        (None: the caller set no deadline)."""
        now = self._clock()
        self._last_start = now
        if remaining_s is not None and remaining_s < self._late_below:
            self._late_calls[rpc].inc()
            self._suspect(rpc, now)

    def stalled(self, since: float) -> None:
        """The event loop did not run from ``since`` (monotonic) until now. A stall
        before the first connect call is none: nothing could be restored for it (the
        sweep needs the peer ports connect calls show)."""
        if self._last_start > -math.inf:
            self._stalls.inc()
            self._suspect(STALL, since)

    def _suspect(self, kind: str, at: float) -> None:
        seen = self._seen.get(kind)
        if seen is None:
            self._seen[kind] = Suspicions(at, at)
        else:
            seen.last = max(seen.last, at)
            seen.count += 1

    def take(self) -> dict[str, Suspicions]:
        """The suspicions since the last look, by kind; they are forgotten."""
        seen, self._seen = self._seen, {}
        return seen

    def quiet_for(self, seconds: float) -> bool:
        """Has no connect call reached its handler for ``seconds``?"""
        return self._clock() - self._last_start >= seconds

    async def watch_stalls(self) -> None:
        while True:
            before = self._clock()
            await asyncio.sleep(self._tick)
            if self._clock() - before - self._tick >= self._stall_after:
                self.stalled(before)


RestoreMissed = Callable[[ClientRef], bool]


class MissedConnectSweep:
    """The loop that turns suspicions into restores (see the module doc)."""

    def __init__(self, risk: ConnectRisk, api: EmqxApi, restore: RestoreMissed, flags: BrokerFlags,
                 metrics: Metrics, busy: Callable[[], bool], wall: Callable[[], float] = time.time,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._risk = risk
        self._api = api
        self._restore = restore
        self._flags = flags
        self._metrics = metrics
        self._busy = busy
        self._wall = wall
        self._clock = clock
        # kind -> (first, last) epoch s of the suspicions each look found, from the
        # look-back only: what a later suspicion of the other kind can pair with
        self._recent: dict[str, list[tuple[float, float]]] = {}
        # the start (epoch ms) of the window an owed sweep covers, and when (monotonic)
        # it became owed; both are kept until a sweep covers the window
        self._window_ms: int | None = None
        self._owed_at: float | None = None
        # a storm can bring late calls every second: one line a minute says how many
        self._log = RateLimitedLog()
        self._unlogged: dict[str, int] = {}

    def pending_since(self) -> int | None:
        """The start (epoch ms) of the window a sweep owes, or None."""
        return self._window_ms

    def note_suspicions(self) -> None:
        """Take the suspicions since the last look; a sweep is owed after a stall, or
        after late calls of both connect hooks within the look-back of each other. Its
        window starts the look-back before the earliest suspicion still in the look-back:
        one hook late for an hour on its own puts no client at risk."""
        wall, now = self._wall(), self._clock()
        seen = self._risk.take()
        for kind, suspicions in seen.items():
            self._unlogged[kind] = self._unlogged.get(kind, 0) + suspicions.count
            if self._owed_at is None:  # an owed window already covers whatever comes now
                at = (wall - (now - suspicions.first), wall - (now - suspicions.last))
                self._recent.setdefault(kind, []).append(at)
        if seen:
            self._log_suspicions()
        if self._owed_at is not None:
            return
        cutoff = wall - LOOKBACK_S
        self._recent = {kind: kept for kind, looks in self._recent.items()
                        if (kept := [at for at in looks if at[1] >= cutoff])}
        if STALL in self._recent or CONNECT_RPCS <= self._recent.keys():
            first = min(first for looks in self._recent.values() for first, _ in looks)
            self._window_ms = int((first - LOOKBACK_S) * 1000)
            self._owed_at = now

    def _log_suspicions(self) -> None:
        if not self._log.note():
            return
        late = {HOOK_OF_RPC[rpc]: self._unlogged.get(rpc, 0) for rpc in sorted(CONNECT_RPCS)}
        stalls = self._unlogged.get(STALL, 0)
        log.warning("the broker may have given up on connect hook calls: %s reached the service with under half "
                    "of exhook.emqx.hook_timeout left, the event loop stalled %d times",
                    ", ".join(f"{n} {hook}" for hook, n in late.items()), stalls,
                    extra={"event": "connect_calls_at_risk", "stalls": stalls,
                           **{f"late_{hook.replace('.', '_')}": n for hook, n in late.items()}})
        self._unlogged.clear()

    def due(self) -> bool:
        """Is a sweep owed, and is the storm over here (no connect call for a while,
        no background job waiting for a slot), or has it waited long enough?"""
        if self._owed_at is None:
            return False
        settled = self._risk.quiet_for(QUIET_S) and not self._busy()
        return settled or self._clock() - self._owed_at >= SETTLE_MAX_S

    async def run(self) -> None:
        failures = 0
        while True:
            await asyncio.sleep(CHECK_EVERY_S if failures == 0 else _API_BACKOFF.delay(failures))
            self.note_suspicions()
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
        nodes = self._flags.peerport_nodes
        if not nodes:
            # EMQX 5.3 sends no peer port: a connection's key is the same at every connect
            # of the client, and a restore from here could not keep the hooks' replay
            # marks apart from an earlier connection's. Those clients get their
            # subscriptions back at their next connect.
            self._settle()
            log.warning("connect hook calls may have been lost, but this broker sends no peer port (EMQX 5.3): "
                        "clients that lost both are restored at their next connect",
                        extra={"event": "missed_connect_sweep", "sessions": 0, "restores": 0})
            return
        checked = queued = other_nodes = 0
        seen: set[str] = set()
        page, more = 1, True
        while more and page <= MAX_PAGES:
            listed, more = await self._api.fresh_sessions(since, page, PAGE_LIMIT)
            more = more and bool(listed)  # an empty page ends the list whatever it says
            for client in listed:
                checked += 1
                if client.subscriptions or client.clientid in seen:
                    continue
                seen.add(client.clientid)
                if client.node not in nodes:  # a 5.3 node of a cluster being upgraded (see above)
                    other_nodes += 1
                elif self._restore(ClientRef(client.clientid, client.node, client.peerhost, client.peerport)):
                    queued += 1
            page += 1
        if more:
            log.warning("the broker's client list did not end within %d pages: the sweep stopped there", MAX_PAGES,
                        extra={"event": "missed_connect_sweep_truncated"})
        self._settle()
        self._metrics.missed_connect_restores.inc(queued)
        # a sweep that found nobody (the late calls were all served) is no news
        log.log(logging.WARNING if queued or other_nodes else logging.INFO,
                "checked %d fresh sessions for lost connect hooks, restoring %d%s", checked, queued,
                f"; {other_nodes} without subscriptions are on nodes that send no peer port (EMQX 5.3) "
                "and are restored at their next connect" if other_nodes else "",
                extra={"event": "missed_connect_sweep", "sessions": checked, "restores": queued,
                       "skipped_no_peerport": other_nodes})

    def _settle(self) -> None:
        self._owed_at = self._window_ms = None
        self._recent.clear()
