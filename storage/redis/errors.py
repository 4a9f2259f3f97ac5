"""What a Redis failure means for the caller: try again, fix the set-up, or set one op aside.

=====================================  ==========================================
failure                                meaning
=====================================  ==========================================
connection refused / lost / reset,     ``StoreError`` (retryable): the same batch
timeout, READONLY (a demoted master),  can succeed later
LOADING, BUSY, MASTERDOWN, CLUSTERDOWN,
TRYAGAIN, MOVED/ASK left over, OOM,
MISCONF, NOREPLICAS, max clients,
anything not named below
NOPERM, NOAUTH/WRONGPASS (credentials  ``StoreConfigError``: someone changed the
changed), unknown command or           server or the ACL under the running service;
subcommand, syntax error (a server     retried, but reported on /readyz
too old for ``ZRANGE BYSCORE``)
WRONGTYPE on a key an op names         ``WriteRejected("wrong_type")`` for that op
(a topic spelled like a message id)
WRONGTYPE on the service's own keys    ``StoreConfigError`` (not about one op)
a value over Redis' bulk limit         ``WriteRejected("too_large")``, found before
                                       sending (``ops.py``): Redis would close the
                                       connection, which looks transient
=====================================  ==========================================

Texts are one line (``storage.errors``); Redis error replies never echo
credentials, and no key or value is put into them here.
"""

from __future__ import annotations

import asyncio
from enum import Enum

from redis.exceptions import (
    AuthenticationError,
    AuthenticationWrongNumberOfArgsError,
    NoPermissionError,
    RedisClusterException,
    RedisError,
    ResponseError,
)

from storage.base import StoreConfigError, StoreError
from storage.errors import first_line, one_line

# what a round trip may raise (anything else is a bug and propagates as such)
ERRORS = (RedisError, RedisClusterException, OSError, asyncio.TimeoutError)

# the server does not know what we send: a server or ACL set-up problem
_SETUP_TEXTS = ("unknown command", "unknown subcommand", "syntax error", "wrong number of arguments")


class Kind(Enum):
    TRANSIENT = "transient"
    SETUP = "setup"
    WRONG_TYPE = "wrong_type"


def kind_of(exc: BaseException) -> Kind:
    """Sort one failure (a raised exception or one reply of a pipeline)."""
    if isinstance(exc, (NoPermissionError, AuthenticationError, AuthenticationWrongNumberOfArgsError)):
        return Kind.SETUP
    # redis-py strips the code of the errors it maps to classes; these two it does not
    if type(exc) is ResponseError:
        text = str(exc)
        if text.startswith("WRONGTYPE"):
            return Kind.WRONG_TYPE
        if any(part in text for part in _SETUP_TEXTS):
            return Kind.SETUP
    return Kind.TRANSIENT


def wrap(exc: BaseException, what: str) -> StoreError:
    """A failed round trip as the store error the caller acts on."""
    if isinstance(exc, NoPermissionError):
        return StoreConfigError(f"redis {what}: permission denied: {first_line(exc)}")
    if isinstance(exc, (AuthenticationError, AuthenticationWrongNumberOfArgsError)):
        return StoreConfigError(f"redis {what}: authentication failed: {first_line(exc)}")
    if kind_of(exc) is Kind.SETUP:
        return StoreConfigError(f"redis {what}: {first_line(exc)}")
    return StoreError(f"redis {what}: {one_line(exc)}")
