"""Hook calls made directly over gRPC, as a broker (or a hostile client) sends them:
the reliability tests need requests no well-behaved emulated broker would make."""

from __future__ import annotations

import time
from types import ModuleType
from typing import Any

import grpc

from exhook.pb.v2 import exhook_pb2 as v2_pb
from exhook.pb.v2 import exhook_pb2_grpc as v2_grpc
from exhook.pb.v3 import exhook_pb2 as v3_pb
from exhook.pb.v3 import exhook_pb2_grpc as v3_grpc
from tests.emulator.guid import GuidGen

PB: dict[str, ModuleType] = {"v2": v2_pb, "v3": v3_pb}
GRPC: dict[str, ModuleType] = {"v2": v2_grpc, "v3": v3_grpc}

_ids = GuidGen("reliability@127.0.0.1")


def new_id() -> str:
    """A fresh broker GUID (32 hex digits), as EMQX makes them."""
    return _ids.gen()


def stub(channel: grpc.aio.Channel | grpc.Channel, version: str) -> Any:
    return GRPC[version].HookProviderStub(channel)


def message(version: str, msgid: str, topic: str, payload: bytes, *, qos: int = 1, sender: str = "pub",
            timestamp: int | None = None) -> Any:
    pb = PB[version]
    ts = int(time.time() * 1000) if timestamp is None else timestamp
    return pb.Message(node="emqx@127.0.0.1", id=msgid, qos=qos, topic=topic, payload=payload, timestamp=ts,
                      **{"from": sender})


def publish_request(version: str, msg: Any) -> Any:
    return PB[version].MessagePublishRequest(message=msg)


def acked_request(version: str, msg: Any, clientid: str = "sub") -> Any:
    pb = PB[version]
    return pb.MessageAckedRequest(clientinfo=pb.ClientInfo(node="emqx@127.0.0.1", clientid=clientid),
                                  message=msg)


def clientinfo(version: str, clientid: str, peerport: int = 50000) -> Any:
    return PB[version].ClientInfo(node="emqx@127.0.0.1", clientid=clientid, username="u", peerhost="127.0.0.1",
                                  peerport=peerport)


def subscribed_request(version: str, clientid: str, topic: str, qos: int = 1) -> Any:
    pb = PB[version]
    return pb.SessionSubscribedRequest(clientinfo=clientinfo(version, clientid), topic=topic,
                                       subopts=pb.SubOpts(qos=qos))


def is_ignore(version: str, answer: Any) -> bool:
    """A ``message.publish`` answer that leaves the message unchanged."""
    return bool(answer.type == PB[version].ValuedResponse.IGNORE and not answer.HasField("message"))
