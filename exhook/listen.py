"""Binding the gRPC port with errors an operator can act on.

grpc's ``add_*_port`` fails with a generic RuntimeError ("Failed to bind to address
...") and prints its own unformatted error line from C. So the address is first
resolved and bound here the way gRPC will bind it: a name that does not resolve or
a port another program holds becomes one line naming ``exhook.listen``, the address
and the cause, which start-up turns into one critical line and exit status 2.

SO_REUSEPORT is set on the trial bind only for a worker of a multi-process service
(its siblings hold the port with it); a single process, or the supervisor before it
starts its workers, binds plainly, so any process already on the port is refused.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import grpc

from exhook.config import HostPort, ServerTlsConfig
from exhook.tls import grpc_server_credentials

AddrInfo = tuple[Any, ...]  # one entry of getaddrinfo


async def add_grpc_port(server: grpc.aio.Server, listen: HostPort, tls: ServerTlsConfig,
                        reuse_port: bool = False) -> int:
    """Add the listening port to ``server``; the port bound (the OS's choice for 0).
    ``OSError`` with one line naming ``exhook.listen`` when it cannot be bound."""
    loop = asyncio.get_running_loop()
    try:
        found = await loop.getaddrinfo(listen.host, listen.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise OSError(_unresolvable(listen, exc)) from None
    problem = _bind_problem(found[0], listen, reuse_port)
    if problem:
        raise OSError(problem)
    try:
        if tls.enable:
            port = server.add_secure_port(str(listen), grpc_server_credentials(tls))
        else:
            port = server.add_insecure_port(str(listen))
    except RuntimeError:  # the trial bind passed, yet gRPC could not bind: say so without its text
        port = 0
    if port == 0:
        raise OSError(f"exhook.listen: cannot listen on {listen}")
    return port


def port_problem(listen: HostPort, reuse_port: bool = False) -> str:
    """Why ``listen`` cannot be bound ("" when it can); blocking, for use before the loop runs."""
    try:
        found = socket.getaddrinfo(listen.host, listen.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return _unresolvable(listen, exc)
    return _bind_problem(found[0], listen, reuse_port)


def _unresolvable(listen: HostPort, exc: socket.gaierror) -> str:
    return f"exhook.listen: cannot resolve {listen.host!r}: {exc.strerror}"


def _bind_problem(info: AddrInfo, listen: HostPort, reuse_port: bool) -> str:
    family, kind, proto, _, address = info
    with socket.socket(family, kind, proto) as probe:
        # as gRPC does: connections of an earlier run in TIME_WAIT do not hold the port
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            return f"exhook.listen: cannot listen on {listen}: {exc.strerror}"
    return ""
