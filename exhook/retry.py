"""Bounded retries for background work (restores, replays, subscription writes)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from exhook.emqx_api import EmqxApiError
from storage.base import StoreConfigError, StoreError

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_DELAYS_S = (0.1, 0.5, 2.0)


async def retrying(what: str, call: Callable[[], Awaitable[T]], delays: tuple[float, ...] = RETRY_DELAYS_S) -> T:
    """Run ``call``; on a store or REST failure that may pass, retry after each of
    ``delays``; re-raise the last failure."""
    for delay in (*delays, None):
        try:
            return await call()
        except StoreConfigError:
            raise
        except (StoreError, EmqxApiError) as exc:
            if delay is None or (isinstance(exc, EmqxApiError) and not exc.retryable):
                raise
            level = logging.DEBUG if isinstance(exc, EmqxApiError) and exc.expected else logging.WARNING
            log.log(level, "%s failed, retrying in %.2f s: %s", what, delay, exc)
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")
