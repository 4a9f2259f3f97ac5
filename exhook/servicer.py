"""Where hook calls enter: the two ExHook proto packages, mapped onto ``HookLogic``.

``emqx.exhook.v3`` (EMQX 5.9+) and ``emqx.exhook.v2`` (EMQX 5.0-5.8) have the same
RPCs; v3 additionally shows a published message's MQTT 5 user properties, which is
how a replay is recognised there. Every call passes one gate before its hook runs:
the caller's address (``exhook.allowed_clients``), a request that decodes, and a
request that can be right (``exhook.validate``). A call that fails the gate is
answered at once, without touching the store: ``message.publish`` with IGNORE (the
broker publishes the message unchanged, it is not stored), every other hook (whose
answer the broker ignores) with INVALID_ARGUMENT or PERMISSION_DENIED. Each such
call is counted in ``requests_rejected_total{hook,reason}`` and logged as one line
per hook and reason per minute. Hooks the service does not register are answered
with an empty success in case a broker calls them anyway.

The two connect hooks tell ``missed_connects.ConnectRisk`` how much of its deadline
each call had left when its handler started: calls that come late are the sign that
the broker may have given up on others.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from types import ModuleType
from typing import Any
from urllib.parse import unquote

import grpc

from exhook.emqx_api import REPLAY_PROPERTY
from exhook.hooks import HTTP_API, ClientRef, HookLogic
from exhook.metrics import HOOK_OF_RPC, Metrics
from exhook.missed_connects import CLIENT_CONNECTED, SESSION_CREATED, ConnectRisk
from exhook.pb.v2 import exhook_pb2 as v2_pb2
from exhook.pb.v3 import exhook_pb2 as v3_pb2
from exhook.validate import (
    acked_problem,
    client_hook_problem,
    is_guid,
    publish_problem,
    subscribed_problem,
    unsubscribed_problem,
)
from storage.ratelog import RateLimitedLog

log = logging.getLogger(__name__)
Ctx = grpc.aio.ServicerContext[Any, Any]
Handler = Callable[[Any, Ctx], Awaitable[Any]]

_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "OnMessagePublish": publish_problem,
    "OnMessageAcked": acked_problem,
    "OnSessionSubscribed": subscribed_problem,
    "OnSessionUnsubscribed": unsubscribed_problem,
    "OnSessionCreated": client_hook_problem,
    "OnSessionResumed": client_hook_problem,
    "OnClientConnected": client_hook_problem,
}
_PEER_CACHE_MAX = 4096


class _Undecodable:
    """Stands for a request whose bytes are not the message they should be."""


UNDECODABLE = _Undecodable()


def from_rest(sender: str, headers: Mapping[str, str]) -> bool:
    """Was the message published through EMQX's REST API? Its ``from`` is "http_api",
    but an MQTT client may take that clientid too: an MQTT client's message carries
    its ``protocol`` (and ``peerhost``) in the headers, a REST publish none."""
    return sender == HTTP_API and "protocol" not in headers and "peerhost" not in headers


class PeerFilter:
    """``exhook.allowed_clients``: may this caller use the port? (An answer per
    peer address is cached: the broker keeps a few long-lived connections.)"""

    def __init__(self, blocks: tuple[str, ...]) -> None:
        self._networks = [ipaddress.ip_network(b) for b in blocks]
        self._seen: dict[str, bool] = {}

    @property
    def restricted(self) -> bool:
        """Is there a list at all? (Without one, the peer is not even asked for.)"""
        return bool(self._networks)

    def allows(self, peer: str) -> bool:
        if not self._networks:
            return True
        allowed = self._seen.get(peer)
        if allowed is None:
            allowed = self._check(peer)
            if len(self._seen) >= _PEER_CACHE_MAX:
                self._seen.clear()
            self._seen[peer] = allowed
        return allowed

    def _check(self, peer: str) -> bool:
        # grpc's peer: "ipv4:10.1.2.3:5678", "ipv6:%5B::1%5D:5678" (a URI: the brackets
        # come percent-encoded), "unix:/path"
        kind, _, rest = unquote(peer).partition(":")
        if kind == "ipv4":
            host = rest.rsplit(":", 1)[0]
        elif kind == "ipv6":
            host = rest.rsplit("]", 1)[0].lstrip("[").split("%", 1)[0]
        else:
            return False
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self._networks)


class RejectLog:
    """One line per (hook, reason) per minute, with how many calls it stands for."""

    def __init__(self) -> None:
        self._limit = RateLimitedLog()

    def note(self, hook: str, reason: str, detail: str) -> None:
        count = self._limit.note((hook, reason))
        if count:
            log.warning("%s request rejected: %s", hook, reason,
                        extra={"event": "request_rejected", "hook": hook, "reason": reason, "detail": detail,
                               "rejected_since_last_line": count})


class HookProvider:
    """The body of both packages' servicers; ``pb`` is the package's generated module."""

    def __init__(self, pb: ModuleType, logic: HookLogic, metrics: Metrics, peers: PeerFilter,
                 rejects: RejectLog, connect_risk: ConnectRisk) -> None:
        self.pb = pb
        self._connect_risk = connect_risk
        self.is_v2 = pb is v2_pb2
        self._logic = logic
        self._metrics = metrics
        self._calls = metrics.hook_calls
        self._publish_latency = metrics.publish_latency
        self._peers = peers
        self._rejects = rejects
        self._empty = pb.EmptySuccess()
        # Never change the message: IGNORE leaves it untouched and sends no payload back.
        self._ignore = pb.ValuedResponse(type=pb.ValuedResponse.IGNORE)
        self._hooks: dict[str, Handler] = {
            "OnProviderLoaded": self._provider_loaded,
            "OnMessagePublish": self._message_publish,
            "OnMessageAcked": self._message_acked,
            "OnSessionSubscribed": self._session_subscribed,
            "OnSessionUnsubscribed": self._session_unsubscribed,
            "OnSessionCreated": self._session_created,
            "OnSessionResumed": self._session_resumed,
            "OnClientConnected": self._client_connected,
        }

    # -- the gate every call passes -------------------------------------------------------
    def handler(self, rpc: str) -> Handler:
        hook = HOOK_OF_RPC[rpc]
        check = _CHECKS.get(rpc)
        body = self._hooks.get(rpc, self._unused(rpc))
        valued = rpc in ("OnMessagePublish", "OnClientAuthenticate", "OnClientAuthorize")

        async def gate(request: Any, context: Ctx) -> Any:
            # looked up per call: a hook's counter appears at its first call (Metrics.hook_calls)
            self._calls[rpc].inc()
            if self._peers.restricted and not self._peers.allows(context.peer()):
                return self._reject(context, hook, "not_allowed", grpc.StatusCode.PERMISSION_DENIED,
                                    context.peer(), valued)
            if request is UNDECODABLE:
                return self._reject(context, hook, "undecodable", grpc.StatusCode.INVALID_ARGUMENT,
                                    "the request does not decode", valued)
            problem = check(request) if check is not None else None
            if problem is not None:
                return self._reject(context, hook, problem, grpc.StatusCode.INVALID_ARGUMENT, _summary(request),
                                    valued)
            return await body(request, context)

        return gate

    def _reject(self, context: Ctx, hook: str, reason: str, code: grpc.StatusCode, detail: str,
                valued: bool) -> Any:
        self._metrics.request_rejected(hook, reason)
        self._rejects.note(hook, reason, detail)
        if valued:
            # the broker uses this answer: IGNORE lets the message (or client) pass unchanged
            return self._ignore
        context.set_code(code)
        context.set_details(f"offline-exhook: {reason}")
        return self._empty

    def _unused(self, rpc: str) -> Handler:
        answer = self._ignore if rpc in ("OnClientAuthenticate", "OnClientAuthorize") else self._empty

        async def unused(request: Any, context: Ctx) -> Any:
            return answer

        return unused

    # -- the hooks ---------------------------------------------------------------------------
    def _client(self, info: Any) -> ClientRef:
        if info.peerport:
            self._logic.flags.saw_peerport(info.node)
        return ClientRef(info.clientid, info.node, info.peerhost, info.peerport)

    def _seen(self) -> None:
        if self.is_v2:
            self._logic.flags.v2_seen = True

    async def _provider_loaded(self, request: Any, context: Ctx) -> Any:
        self._seen()
        specs = self._logic.hook_specs()
        log.info("broker loaded this provider", extra={
            "event": "provider_loaded", "broker_version": request.broker.version or "?",
            "broker_node": request.meta.node,
            "protocol": "v2" if self.is_v2 else "v3",
            "hooks": ",".join(name for name, _ in specs) or "none (no topics configured)"})
        return self.pb.LoadedResponse(hooks=[self.pb.HookSpec(name=n, topics=t) for n, t in specs])

    async def _message_publish(self, request: Any, context: Ctx) -> Any:
        started = time.perf_counter()
        msg = request.message
        sender = getattr(msg, "from")
        rest = from_rest(sender, msg.headers)
        replay_of = None
        if self.is_v2:
            self._logic.flags.v2_seen = True
        elif rest:
            for prop in request.user_props:
                if prop.name == REPLAY_PROPERTY:
                    replay_of = prop.value if is_guid(prop.value) else None  # one of our ids
                    break
        await self._logic.message_publish(
            msg.id, sender, msg.topic, msg.qos, msg.payload, msg.timestamp, replay_of, from_rest=rest
        )
        self._publish_latency.observe(time.perf_counter() - started)
        return self._ignore

    async def _message_acked(self, request: Any, context: Ctx) -> Any:
        msg = request.message
        self._logic.message_acked(msg.id, msg.topic, request.clientinfo.clientid,
                                  from_rest=from_rest(getattr(msg, "from"), msg.headers))
        return self._empty

    async def _session_subscribed(self, request: Any, context: Ctx) -> Any:
        self._seen()
        self._logic.session_subscribed(self._client(request.clientinfo), request.topic, request.subopts.qos)
        return self._empty

    async def _session_unsubscribed(self, request: Any, context: Ctx) -> Any:
        self._logic.session_unsubscribed(self._client(request.clientinfo), request.topic)
        return self._empty

    async def _session_created(self, request: Any, context: Ctx) -> Any:
        self._connect_risk.started(SESSION_CREATED, context.time_remaining())
        self._seen()
        self._logic.session_created(self._client(request.clientinfo))
        return self._empty

    async def _session_resumed(self, request: Any, context: Ctx) -> Any:
        self._logic.session_resumed(self._client(request.clientinfo))
        return self._empty

    async def _client_connected(self, request: Any, context: Ctx) -> Any:
        self._connect_risk.started(CLIENT_CONNECTED, context.time_remaining())
        self._seen()
        self._logic.client_connected(self._client(request.clientinfo))
        return self._empty


def _summary(request: Any) -> str:
    """What identifies a rejected request in its log line (never a payload)."""
    msg = getattr(request, "message", None)
    info = getattr(request, "clientinfo", None)
    parts = []
    if msg is not None:
        parts += [f"id={msg.id[:40]!r}", f"qos={msg.qos}", f"timestamp={msg.timestamp}", f"topic={msg.topic[:100]!r}"]
    if info is not None:
        parts.append(f"clientid={info.clientid[:100]!r}")
    topic = getattr(request, "topic", None)
    if isinstance(topic, str):
        parts.append(f"filter={topic[:100]!r}")
    return " ".join(parts)


def _tolerant(decode: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """A request deserializer that never raises: grpc would log a traceback and
    answer UNKNOWN; the gate answers INVALID_ARGUMENT instead."""
    def deserialize(data: bytes) -> Any:
        try:
            return decode(data)
        except Exception:  # protobuf's DecodeError, or anything a hostile payload provokes
            return UNDECODABLE

    return deserialize


def add_servicers(server: grpc.aio.Server, logic: HookLogic, metrics: Metrics,
                  allowed_clients: tuple[str, ...], connect_risk: ConnectRisk) -> None:
    peers = PeerFilter(allowed_clients)
    rejects = RejectLog()
    for pb in (v3_pb2, v2_pb2):
        provider = HookProvider(pb, logic, metrics, peers, rejects, connect_risk)
        service = pb.DESCRIPTOR.services_by_name["HookProvider"]
        handlers = {
            method.name: grpc.unary_unary_rpc_method_handler(
                provider.handler(method.name),
                request_deserializer=_tolerant(getattr(pb, method.input_type.name).FromString),
                response_serializer=getattr(pb, method.output_type.name).SerializeToString,
            )
            for method in service.methods
        }
        # the faster path of grpcio >= 1.63 for methods known at start-up (stubs lag behind):
        # grpc looks a registered method up without asking Python
        server.add_registered_method_handlers(service.full_name, handlers)  # type: ignore[attr-defined]
