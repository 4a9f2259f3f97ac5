"""Binding the gRPC port with errors an operator can act on.

grpc's ``add_*_port`` fails with a generic RuntimeError ("Failed to bind to address
...") and prints its own unformatted error line from C. So the address is first
resolved and bound here, the way gRPC will bind it (SO_REUSEPORT, which the workers
of one service share): a name that does not resolve or a port another program holds
becomes one ``OSError`` naming ``exhook.listen``, the address and the cause, which
start-up turns into one critical line and exit status 2.
"""

from __future__ import annotations

import asyncio
import socket

import grpc

from exhook.config import HostPort, ServerTlsConfig
from exhook.tls import grpc_server_credentials


async def add_grpc_port(server: grpc.aio.Server, listen: HostPort, tls: ServerTlsConfig) -> int:
    """Add the listening port to ``server``; the port bound (the OS's choice for 0)."""
    await check_bindable(listen)
    try:
        if tls.enable:
            port = server.add_secure_port(str(listen), grpc_server_credentials(tls))
        else:
            port = server.add_insecure_port(str(listen))
    except RuntimeError:  # the checks above passed, yet gRPC could not bind: say so without its text
        port = 0
    if port == 0:
        raise OSError(f"exhook.listen: cannot listen on {listen}")
    return port


async def check_bindable(listen: HostPort) -> None:
    """``OSError`` (one line naming ``exhook.listen``) if ``listen`` cannot be bound."""
    loop = asyncio.get_running_loop()
    try:
        found = await loop.getaddrinfo(listen.host, listen.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise OSError(f"exhook.listen: cannot resolve {listen.host!r}: {exc.strerror}") from None
    family, kind, proto, _, address = found[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise OSError(f"exhook.listen: cannot listen on {listen}: {exc.strerror}") from None
