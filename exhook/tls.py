"""TLS of the gRPC listener EMQX connects to. (Client contexts for outgoing
connections are built by ``storage.tls.client_context``.)"""

from __future__ import annotations

from pathlib import Path

import grpc

from exhook.config import ServerTlsConfig


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
