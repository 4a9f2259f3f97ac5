"""The service's Prometheus metrics, served on ``/metrics``.

Each ``Service`` owns one registry (tests run several services in one process),
with the standard ``process_*`` metrics of prometheus-client's ProcessCollector
(RSS, open fds, CPU) and ``offline_exhook_build_info``. Labelled children that sit
on the hot path are resolved once here, because ``.labels()`` costs a dict lookup
and a lock on every call.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

from exhook.buildinfo import build_info

PREFIX = "offline_exhook_"

# rpc name -> the EMQX hook it carries (the label operators know)
HOOK_OF_RPC = {
    "OnProviderLoaded": "provider.loaded",
    "OnProviderUnloaded": "provider.unloaded",
    "OnClientConnect": "client.connect",
    "OnClientConnack": "client.connack",
    "OnClientConnected": "client.connected",
    "OnClientDisconnected": "client.disconnected",
    "OnClientAuthenticate": "client.authenticate",
    "OnClientAuthorize": "client.authorize",
    "OnClientSubscribe": "client.subscribe",
    "OnClientUnsubscribe": "client.unsubscribe",
    "OnSessionCreated": "session.created",
    "OnSessionSubscribed": "session.subscribed",
    "OnSessionUnsubscribed": "session.unsubscribed",
    "OnSessionResumed": "session.resumed",
    "OnSessionDiscarded": "session.discarded",
    "OnSessionTakenover": "session.takenover",
    "OnSessionTerminated": "session.terminated",
    "OnMessagePublish": "message.publish",
    "OnMessageDelivered": "message.delivered",
    "OnMessageDropped": "message.dropped",
    "OnMessageAcked": "message.acked",
}

RPC_OF_HOOK = {hook: rpc for rpc, hook in HOOK_OF_RPC.items()}
# the broker always calls this one: its counter says whether EMQX ever loaded the service
ALWAYS_CALLED = ("OnProviderLoaded",)

SKIP_REASONS = ("qos0", "untracked", "sys", "replay")
DEADLINE_REASONS = ("store_slow", "spool_full")

# message.publish answers are sub-millisecond when healthy and capped by publish_deadline
_LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


class _LabelsOnDemand(dict[str, Counter]):
    """rpc name -> its labelled child, created at its first use: a hook the service
    never registered shows up only if a broker calls it anyway."""

    def __init__(self, family: Counter) -> None:
        super().__init__()
        self._family = family

    def __missing__(self, rpc: str) -> Counter:
        child = self[rpc] = self._family.labels(HOOK_OF_RPC.get(rpc, rpc))
        return child


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._process_and_hooks()
        self._messages()
        self._background()
        self._store()
        self._spool_and_rejections()
        self._emqx_api()

    def _process_and_hooks(self) -> None:
        reg, p = self.registry, PREFIX
        ProcessCollector(registry=reg)
        info = build_info()
        Gauge(f"{p}build_info", "Always 1; the labels say which build runs", list(info), registry=reg,
              multiprocess_mode="max").labels(**info).set(1)
        self._hook_calls = Counter(f"{p}hook_calls", "ExHook calls received, per hook", ["hook"], registry=reg)
        self.hook_calls = _LabelsOnDemand(self._hook_calls)
        self.expect_hooks(())

    def _messages(self) -> None:
        reg, p = self.registry, PREFIX
        self.messages_stored = Counter(
            f"{p}messages_stored", "Messages durably stored before message.publish was answered", registry=reg)
        skipped = Counter(f"{p}messages_skipped", "Published messages not stored, by reason "
                          "(qos0, untracked topic, $SYS, a replay of ours)", ["reason"], registry=reg)
        self.skipped = {reason: skipped.labels(reason) for reason in SKIP_REASONS}
        deadline = Counter(f"{p}publish_deadline_answers", "message.publish answered at its deadline before "
                           "the store had it (store_slow: durable in the spool, written to the store later; "
                           "spool_full: NOT stored, the spool was full or failing)",
                           ["reason"], registry=reg)
        self.deadline = {reason: deadline.labels(reason) for reason in DEADLINE_REASONS}
        self.publish_latency = Histogram(
            f"{p}publish_duration_seconds", "Time to answer message.publish", buckets=_LATENCY_BUCKETS,
            registry=reg)

        self.acks = Counter(f"{p}messages_acked", "message.acked received for tracked topics", registry=reg)
        self.deleted = Counter(
            f"{p}messages_deleted", "Stored messages deleted on acknowledgement (deletes made durable)", registry=reg)
        self.rekeyed = Counter(
            f"{p}messages_rekeyed", "Replayed messages moved to the id the broker gave the replay", registry=reg)
        self.rekeys_merged = Counter(
            f"{p}rekeys_merged", "Re-keys of replays never written: the ack came while the re-key was held back "
            "and deleted the stored copy under its old id", registry=reg)
        self.writes_dropped = Counter(
            f"{p}writes_dropped", "Acks or re-keys dropped because the write buffer and its overflow were full",
            registry=reg)

    def _background(self) -> None:
        reg, p = self.registry, PREFIX
        self.replayed = Counter(f"{p}messages_replayed", "Stored messages published again that reached a subscriber",
                                registry=reg)
        self.replay_failures = Counter(f"{p}replay_failures", "Replays that gave up (EMQX API or store errors "
                                       "after retries; what they did not deliver stays stored)", registry=reg)
        self.replay_messages_skipped = Counter(
            f"{p}replay_messages_skipped", "Stored messages a replay did not deliver and does not retry on that "
            "connection, by reason (unreadable: the store's row or hash is no message; bad_qos, bad_topic: not valid "
            "to publish; rejected: EMQX answered 400 for it alone; not_dispatched: EMQX failed to dispatch it); all "
            "stay stored", ["reason"], registry=reg)
        self.restore_subscriptions_skipped = Counter(
            f"{p}restore_subscriptions_skipped", "Stored subscriptions a restore did not give back, by reason "
            "(bad_qos, bad_filter: not valid to subscribe; rejected: EMQX answered 400 for it alone)", ["reason"],
            registry=reg)
        self.restores = Counter(f"{p}subscription_restores", "Clients whose stored subscriptions were restored",
                                registry=reg)
        self.connect_calls_late = Counter(
            f"{p}connect_calls_late", "session.created / client.connected calls that reached their handler with "
            "under half of the broker's hook timeout left (calls behind them may have been dropped), by hook",
            ["hook"], registry=reg)
        self.loop_stalls = Counter(
            f"{p}loop_stalls", "Times the event loop's ticker woke a quarter of the broker's hook timeout late or more "
            "(the loop did not run meanwhile)",
            registry=reg)
        self.missed_connect_restores = Counter(
            f"{p}missed_connect_restores", "Clients the sweep after late connect calls or a stall queued for a "
            "re-subscribe", registry=reg)
        self.log_lines_dropped = Counter(
            f"{p}log_lines_dropped", "Log lines dropped because stderr did not take them fast enough (the "
            "service never waits for its log output)", registry=reg)
        self.jobs_dropped = Counter(
            f"{p}client_jobs_dropped", "Background jobs dropped (a client's queue full, or the service shutting "
            "down)", registry=reg)
        self.jobs_retry_waiting = Gauge(
            f"{p}client_jobs_retry_waiting", "Restores and replays waiting to be tried again after a store or EMQX "
            "API failure outlasted their retries", registry=reg, multiprocess_mode="livesum")

    def _store(self) -> None:
        reg, p = self.registry, PREFIX
        self._store_failures = Counter(f"{p}store_failures", "Failed backend operations, by operation (write, "
                                       "latest_positions, ...; each is retried)", ["operation"], registry=reg)
        self.write_latency = Histogram(
            f"{p}store_write_duration_seconds", "Time of one batched backend write", buckets=_LATENCY_BUCKETS,
            registry=reg)
        self.batch_size = Histogram(f"{p}store_write_batch_size", "Operations per batched backend write",
                                    buckets=_BATCH_BUCKETS, registry=reg)
        # the modes say how worker processes add up (multiprocess mode only; see exhook.supervisor)
        self.pending_writes = Gauge(f"{p}pending_writes", "Writes buffered, not yet durable", registry=reg,
                                    multiprocess_mode="livesum")
        self.backend_up = Gauge(f"{p}backend_up", "1 when the backend answered its last check", registry=reg,
                                multiprocess_mode="livemin")

    def _spool_and_rejections(self) -> None:
        reg, p = self.registry, PREFIX
        self.spool_bytes = Gauge(f"{p}spool_bytes", "Bytes of write ops waiting in the local spool", registry=reg,
                                 multiprocess_mode="livesum")
        self.spool_pending = Gauge(f"{p}spool_pending", "Write ops waiting in the local spool for the store",
                                   registry=reg, multiprocess_mode="livesum")
        self.spooled = Counter(f"{p}spooled", "Write ops put into the local spool (the store was slow or down)",
                               registry=reg)
        self.spool_drained = Counter(f"{p}spool_drained", "Write ops moved from the local spool into the store",
                                     registry=reg)
        self._writes_rejected = Counter(
            f"{p}writes_rejected", "Write ops the store refused for good (set aside, logged with msgid and topic), "
            "by backend and reason", ["backend", "reason"], registry=reg)
        self._requests_rejected = Counter(
            f"{p}requests_rejected", "Hook requests that cannot be right (answered at once, nothing stored), "
            "by hook and reason", ["hook", "reason"], registry=reg)
        self._loop_restarts = Counter(
            f"{p}loop_restarts", "Background loops restarted after an unexpected failure, by loop", ["loop"],
            registry=reg)

    def _emqx_api(self) -> None:
        reg, p = self.registry, PREFIX
        self._api_errors = Counter(f"{p}emqx_api_errors", "Failed EMQX REST API calls, by endpoint and status: "
                                   "the HTTP status code (\"401\", \"503\", ...), \"unreachable\" (no connection) "
                                   "or \"timeout\" (no answer within exhook.emqx.request_timeout)",
                                   ["endpoint", "status"], registry=reg)
        self.emqx_api_up = Gauge(f"{p}emqx_api_up", "1 when EMQX's REST API accepted the API key at its last check",
                                 registry=reg, multiprocess_mode="livemin")

    def expect_hooks(self, hooks: Iterable[str]) -> None:
        """Show a zero for each hook the service registers (and provider.loaded), so a
        rate() works before the first call; others appear when first called."""
        for rpc in (*ALWAYS_CALLED, *(RPC_OF_HOOK[hook] for hook in hooks)):
            self.hook_calls[rpc]  # creating the child is the point

    def store_failure(self, operation: str) -> None:
        self._store_failures.labels(operation).inc()

    def write_rejected(self, backend: str, reason: str) -> None:
        self._writes_rejected.labels(backend, reason).inc()

    def request_rejected(self, hook: str, reason: str) -> None:
        self._requests_rejected.labels(hook, reason).inc()

    def loop_restarted(self, loop: str) -> None:
        self._loop_restarts.labels(loop).inc()

    def api_error(self, endpoint: str, status: int | str) -> None:
        """``status``: the HTTP status code, or ``"unreachable"`` / ``"timeout"``."""
        self._api_errors.labels(endpoint, str(status)).inc()

    def sample(self, name: str, **labels: str) -> float:
        """Current value of one sample, by its exposed name (``..._total`` for
        counters), 0 if it was never set: for tests, the bench and the stop log."""
        value = self.registry.get_sample_value(PREFIX + name, labels)
        return value if value is not None else 0.0

    def summary(self) -> dict[str, int]:
        """Every counter that moved, as ``name`` or ``name.label`` -> total (logged
        at shutdown as key=value fields)."""
        out: dict[str, int] = {}
        for family in self.registry.collect():
            if family.type != "counter":
                continue
            for s in family.samples:
                if s.name.endswith("_total") and s.value:
                    key = ".".join([s.name.removeprefix(PREFIX).removesuffix("_total"), *s.labels.values()])
                    out[key] = int(s.value)
        return out
