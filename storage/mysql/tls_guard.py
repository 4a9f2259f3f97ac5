"""No credentials to a MySQL server that drops the TLS offer.

aiomysql starts TLS only if the server's greeting offers it (``CLIENT_SSL``); when it
does not, the driver carries on in clear text and authenticates: with ``ssl``
configured, a server (or anyone between) that leaves the flag out would receive the
user name and, after an auth switch to ``mysql_clear_password``, the password itself.
The driver has no option to require TLS and no way to choose the connection class of
a pool, so its authentication step is wrapped once, here: with a TLS context and no
offer, it fails before a byte of the handshake response is sent.
"""

from __future__ import annotations

from typing import Any

from aiomysql.connection import Connection
from pymysql.constants import CLIENT


class TlsNotOffered(ConnectionError):
    """The server's greeting did not offer TLS although the connection requires it."""


_original: Any = Connection._request_authentication


async def _authenticate_over_tls_only(self: Any) -> None:
    if self._ssl_context is not None and not self.server_capabilities & CLIENT.SSL:
        raise TlsNotOffered("the server did not offer TLS (nothing was sent, credentials included)")
    await _original(self)


def refused(exc: BaseException) -> bool:
    """Whether ``exc`` is, or was caused by, a connection this guard refused (the driver
    wraps it in its own "can't connect" error)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, TlsNotOffered):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def install() -> None:
    """Wrap the driver's authentication step (idempotent)."""
    Connection._request_authentication = _authenticate_over_tls_only  # type: ignore[method-assign]
