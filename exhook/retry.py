"""Bounded retries of background work (restores, replays, subscription writes),
through the service's one retry policy (``storage.retry``)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from exhook.emqx_api import EmqxApiError
from storage.base import StoreError
from storage.retry import Backoff, RetryPolicy

T = TypeVar("T")


def transient(exc: BaseException) -> bool:
    """A store or REST failure that another try may not see (never a refusal, a
    misconfiguration, or a bug)."""
    return isinstance(exc, (StoreError, EmqxApiError)) and exc.retryable


BACKGROUND = RetryPolicy(Backoff(base=0.25, cap=2.0), attempts=4, retryable=transient)

# A subscription write (a client's subscribe or unsubscribe, answered already) is tried
# again for as long as the store fails and the service runs: given up, the client's
# next connect would not restore that subscription, or would give back one it dropped.
UNTIL_STORED = RetryPolicy(Backoff(base=0.5, cap=30.0), attempts=None, retryable=transient)


async def retrying(what: str, call: Callable[[], Awaitable[T]]) -> T:
    """Run ``call``; retry a transient failure up to three times; re-raise the last."""
    return await BACKGROUND.call(what, call)
