"""Single gRPC calls to a service instance, for tests that need to choose which
instance a hook reaches."""

from __future__ import annotations

import grpc

from exhook.pb.v2 import exhook_pb2 as v2_pb2
from exhook.pb.v2 import exhook_pb2_grpc as v2_grpc
from exhook.pb.v3 import exhook_pb2 as v3_pb2
from exhook.pb.v3 import exhook_pb2_grpc as v3_grpc


async def send_ack(port: int, version: str, clientid: str, msgid: str, topic: str, sender: str) -> None:
    pb, stubs = (v3_pb2, v3_grpc) if version == "v3" else (v2_pb2, v2_grpc)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = stubs.HookProviderStub(channel)
        message = pb.Message(id=msgid, qos=1, topic=topic, **{"from": sender})
        await stub.OnMessageAcked(pb.MessageAckedRequest(clientinfo=pb.ClientInfo(clientid=clientid),
                                                         message=message))
