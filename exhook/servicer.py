"""Thin adapters from the two ExHook proto packages to ``HookLogic``.

``emqx.exhook.v3`` (EMQX 5.9+) and ``emqx.exhook.v2`` (EMQX 5.0-5.8) have the same
RPCs; v3 additionally shows a published message's MQTT 5 user properties, which is
how a replay is recognised there. Hooks the service does not register are answered
with an empty success in case a broker calls them anyway.
"""

from __future__ import annotations

import logging
import time
from types import ModuleType
from typing import Any

import grpc

from exhook.emqx_api import REPLAY_PROPERTY
from exhook.hooks import ClientRef, HookLogic
from exhook.metrics import Metrics
from exhook.pb.v2 import exhook_pb2 as v2_pb2
from exhook.pb.v2 import exhook_pb2_grpc as v2_grpc
from exhook.pb.v3 import exhook_pb2 as v3_pb2
from exhook.pb.v3 import exhook_pb2_grpc as v3_grpc

log = logging.getLogger(__name__)
Ctx = grpc.aio.ServicerContext[Any, Any]

_UNUSED_RPCS = (
    "OnProviderUnloaded", "OnClientConnect", "OnClientConnack", "OnClientDisconnected",
    "OnClientSubscribe", "OnClientUnsubscribe", "OnSessionDiscarded",
    "OnSessionTakenover", "OnSessionTerminated", "OnMessageDelivered", "OnMessageDropped",
)


def _client(info: Any) -> ClientRef:
    return ClientRef(info.clientid, info.node, info.peerhost, info.peerport)


class _HookProvider:
    """Shared body of both servicers; ``pb`` is the package's generated module."""

    pb: ModuleType
    is_v2: bool

    def __init__(self, logic: HookLogic, metrics: Metrics) -> None:
        self._logic = logic
        self._calls = metrics.hook_calls
        self._publish_latency = metrics.publish_latency
        self._empty = self.pb.EmptySuccess()
        # Never change the message: IGNORE leaves it untouched and sends no payload back.
        self._ignore = self.pb.ValuedResponse(type=self.pb.ValuedResponse.IGNORE)

    def _seen(self) -> None:
        if self.is_v2:
            self._logic.flags.v2_seen = True

    async def OnProviderLoaded(self, request: Any, context: Ctx) -> Any:
        self._calls["OnProviderLoaded"].inc()
        self._seen()
        specs = self._logic.hook_specs()
        log.info("broker loaded this provider", extra={
            "event": "provider_loaded", "broker_version": request.broker.version or "?",
            "broker_node": request.meta.node,
            "protocol": "v2" if self.is_v2 else "v3",
            "hooks": ",".join(name for name, _ in specs) or "none (no topics configured)"})
        return self.pb.LoadedResponse(hooks=[self.pb.HookSpec(name=n, topics=t) for n, t in specs])

    async def OnMessagePublish(self, request: Any, context: Ctx) -> Any:
        self._calls["OnMessagePublish"].inc()
        started = time.perf_counter()
        msg = request.message
        sender = getattr(msg, "from")
        replay_of = None
        if self.is_v2:
            self._logic.flags.v2_seen = True
        elif sender == "http_api":
            for prop in request.user_props:
                if prop.name == REPLAY_PROPERTY:
                    replay_of = prop.value
                    break
        await self._logic.message_publish(
            msg.id, sender, msg.topic, msg.qos, msg.payload, msg.timestamp, replay_of
        )
        self._publish_latency.observe(time.perf_counter() - started)
        return self._ignore

    async def OnMessageAcked(self, request: Any, context: Ctx) -> Any:
        self._calls["OnMessageAcked"].inc()
        msg = request.message
        self._logic.message_acked(msg.id, getattr(msg, "from"), msg.topic)
        return self._empty

    async def OnSessionSubscribed(self, request: Any, context: Ctx) -> Any:
        self._calls["OnSessionSubscribed"].inc()
        self._seen()
        self._logic.session_subscribed(_client(request.clientinfo), request.topic, request.subopts.qos)
        return self._empty

    async def OnSessionUnsubscribed(self, request: Any, context: Ctx) -> Any:
        self._calls["OnSessionUnsubscribed"].inc()
        self._logic.session_unsubscribed(_client(request.clientinfo), request.topic)
        return self._empty

    async def OnSessionCreated(self, request: Any, context: Ctx) -> Any:
        self._calls["OnSessionCreated"].inc()
        self._seen()
        self._logic.session_created(_client(request.clientinfo))
        return self._empty

    async def OnSessionResumed(self, request: Any, context: Ctx) -> Any:
        self._calls["OnSessionResumed"].inc()
        self._logic.session_resumed(_client(request.clientinfo))
        return self._empty

    async def OnClientConnected(self, request: Any, context: Ctx) -> Any:
        self._calls["OnClientConnected"].inc()
        self._seen()
        self._logic.client_connected(_client(request.clientinfo))
        return self._empty

    async def OnClientAuthenticate(self, request: Any, context: Ctx) -> Any:
        self._calls["OnClientAuthenticate"].inc()
        return self._ignore

    async def OnClientAuthorize(self, request: Any, context: Ctx) -> Any:
        self._calls["OnClientAuthorize"].inc()
        return self._ignore



def _unused(rpc: str) -> Any:
    async def answer(self: _HookProvider, request: Any, context: Ctx) -> Any:
        self._calls[rpc].inc()
        return self._empty

    return answer


for _name in _UNUSED_RPCS:
    setattr(_HookProvider, _name, _unused(_name))


class HookProviderV3(_HookProvider, v3_grpc.HookProviderServicer):  # type: ignore[misc]
    pb = v3_pb2
    is_v2 = False


class HookProviderV2(_HookProvider, v2_grpc.HookProviderServicer):  # type: ignore[misc]
    pb = v2_pb2
    is_v2 = True


def add_servicers(server: grpc.aio.Server, logic: HookLogic, metrics: Metrics) -> None:
    v3_grpc.add_HookProviderServicer_to_server(HookProviderV3(logic, metrics), server)
    v2_grpc.add_HookProviderServicer_to_server(HookProviderV2(logic, metrics), server)
