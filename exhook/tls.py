"""TLS client contexts built from the config's ``ssl { }`` blocks."""

from __future__ import annotations

import ssl

from exhook.config import SslOptions


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
