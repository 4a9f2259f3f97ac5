"""TLS from the config: client contexts for the ``ssl { }`` blocks of outgoing
connections, and server credentials for the gRPC listener."""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc

from exhook.config import ServerTlsConfig, SslOptions


def client_ssl_context(opts: SslOptions) -> ssl.SSLContext:
    """A client context honouring verify, CA, client certificate and SNI.

    ``server_name_indication`` is applied by the caller where its library takes a
    server hostname; with ``verify`` off neither the chain nor the name is checked.
    """
    ctx = ssl.create_default_context(cafile=opts.cacertfile or None)
    if not opts.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if opts.certfile:
        ctx.load_cert_chain(opts.certfile, opts.keyfile or None)
    return ctx


def grpc_server_credentials(opts: ServerTlsConfig) -> grpc.ServerCredentials:
    """Credentials for the listener; with ``verify_peer`` a client without a
    certificate signed by ``cacertfile`` is refused during the handshake."""
    key = Path(opts.keyfile).read_bytes()
    chain = Path(opts.certfile).read_bytes()
    ca = Path(opts.cacertfile).read_bytes() if opts.cacertfile else None
    return grpc.ssl_server_credentials(
        [(key, chain)],
        root_certificates=ca if opts.verify_peer else None,
        require_client_auth=opts.verify_peer,
    )
