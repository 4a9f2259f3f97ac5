"""The one builder of client TLS contexts (MySQL, Redis, EMQX's REST API).

Semantics follow the ``ssl { }`` block of EMQX and the Erlang plugin:
``verify = false`` checks neither the chain nor the name; ``verify = true`` checks
the chain against ``cacertfile`` (the system CAs when empty) and the name against
``server_name_indication``, or against the host connected to when that is empty.
``server_name_indication = disable`` sends no SNI and so checks no name.

The name is applied in the context itself (``wrap_bio``), because every client
library here (asyncio and uvloop streams, aiohttp, aiomysql, redis-py) passes the
host it connects to as ``server_hostname`` and offers no uniform way to change it.
"""

from __future__ import annotations

import ssl

from storage.config import SslOptions


class TlsSetupError(ValueError):
    """A certificate or key file cannot be loaded; the text names the field."""


class _NamedContext(ssl.SSLContext):
    # None: keep the host the library connects to; "": send no SNI at all
    sni_override: str | None = None

    def wrap_bio(  # type: ignore[override]
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        if self.sni_override is not None:
            server_hostname = self.sni_override or None
        return super().wrap_bio(incoming, outgoing, server_side, server_hostname, session)


def client_context(opts: SslOptions, where: str) -> ssl.SSLContext:
    """A client context for ``opts``; ``where`` is the config block (``mysql.ssl``)
    named in errors."""
    ctx = _NamedContext(ssl.PROTOCOL_TLS_CLIENT)
    sni = opts.server_name_indication.strip()
    if sni.lower() == "disable":
        ctx.sni_override = ""
    elif sni:
        ctx.sni_override = sni
    try:
        if opts.verify:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.check_hostname = ctx.sni_override != ""
            if opts.cacertfile:
                ctx.load_verify_locations(cafile=opts.cacertfile)
            else:
                ctx.load_default_certs()
        else:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
    except (OSError, ssl.SSLError) as exc:
        raise TlsSetupError(f"{where}.cacertfile: cannot load {opts.cacertfile!r}: {exc}") from None
    if opts.certfile:
        try:
            # no pass phrase (the ssl block has none): OpenSSL would ask for it on the terminal
            ctx.load_cert_chain(opts.certfile, opts.keyfile or None, password=lambda: b"")
        except (OSError, ssl.SSLError) as exc:
            raise TlsSetupError(f"{where}.certfile: cannot load {opts.certfile!r} / {opts.keyfile!r}: {exc}") from None
    return ctx
