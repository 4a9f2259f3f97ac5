"""The ceiling: a no-op ExHook server. grpc.aio like the service, the same generated
servicers (so it pays the same protobuf decoding), uvloop like the service; it answers
every call at once (IGNORE / empty) and stores nothing.

It registers the hook set given with ``--hooks`` (the bench passes what the service
answered to ``OnProviderLoaded``), so the broker, or the emulator in the storm phase,
makes exactly the calls it would make to the service: the comparison then measures the
service's own cost per call, not a different call pattern.

Run as its own process: ``python -m bench.noop --port P [--workers N] [--hooks JSON]``;
with N > 1 the workers share the port through SO_REUSEPORT, like the service's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import signal
import sys
from typing import Any

import grpc

from exhook.pb.v2 import exhook_pb2 as v2_pb2
from exhook.pb.v2 import exhook_pb2_grpc as v2_grpc
from exhook.pb.v3 import exhook_pb2 as v3_pb2
from exhook.pb.v3 import exhook_pb2_grpc as v3_grpc

# used when no --hooks is given (the service's set before session.created existed)
DEFAULT_HOOKS: list[tuple[str, list[str]]] = [
    *((n, []) for n in ("client.connected", "session.subscribed", "session.unsubscribed", "session.resumed")),
    *((n, ["bench/#"]) for n in ("message.publish", "message.acked")),
]
HookSpecs = list[tuple[str, list[str]]]


def _servicer(pb: Any, base: type, hooks: HookSpecs) -> Any:
    empty = pb.EmptySuccess()
    ignore = pb.ValuedResponse(type=pb.ValuedResponse.IGNORE)
    loaded = pb.LoadedResponse(hooks=[pb.HookSpec(name=n, topics=t) for n, t in hooks])

    class NoopProvider(base):  # type: ignore[misc,valid-type]
        async def OnProviderLoaded(self, request: Any, context: Any) -> Any:
            return loaded

        async def OnMessagePublish(self, request: Any, context: Any) -> Any:
            return ignore

        async def OnClientAuthenticate(self, request: Any, context: Any) -> Any:
            return ignore

        async def OnClientAuthorize(self, request: Any, context: Any) -> Any:
            return ignore

        async def _empty(self, request: Any, context: Any) -> Any:
            return empty

    for name in ("OnProviderUnloaded", "OnClientConnect", "OnClientConnack", "OnClientConnected",
                 "OnClientDisconnected", "OnClientSubscribe", "OnClientUnsubscribe", "OnSessionCreated",
                 "OnSessionSubscribed", "OnSessionUnsubscribed", "OnSessionResumed", "OnSessionDiscarded",
                 "OnSessionTakenover", "OnSessionTerminated", "OnMessageDelivered", "OnMessageDropped",
                 "OnMessageAcked"):
        setattr(NoopProvider, name, NoopProvider._empty)
    return NoopProvider()


async def serve(port: int, hooks: HookSpecs) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
    v3_grpc.add_HookProviderServicer_to_server(_servicer(v3_pb2, v3_grpc.HookProviderServicer, hooks), server)
    v2_grpc.add_HookProviderServicer_to_server(_servicer(v2_pb2, v2_grpc.HookProviderServicer, hooks), server)
    if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
        raise OSError(f"cannot listen on 127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


def _run(port: int, hooks: HookSpecs) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(port, hooks))
    else:
        uvloop.run(serve(port, hooks))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench.noop")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--hooks", default="", help='JSON list of [name, [topics]] (default: %(prog)s\'s own set)')
    args = parser.parse_args(argv)
    hooks = [(str(n), [str(t) for t in topics]) for n, topics in json.loads(args.hooks)] if args.hooks \
        else DEFAULT_HOOKS
    if args.workers <= 1:
        _run(args.port, hooks)
        return
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_run, args=(args.port, hooks)) for _ in range(args.workers)]
    for proc in procs:
        proc.start()

    def forward(signum: int, _frame: object) -> None:
        for proc in procs:
            if proc.pid is not None and proc.is_alive():
                os.kill(proc.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for proc in procs:
        proc.join()
    sys.exit(0)


if __name__ == "__main__":
    main()
