"""The one retry policy of the service: exponential backoff with jitter.

Every loop that tries again (the ordered writer, background store and REST calls,
reopening the store, restarting a supervised loop, a backend's own repeat after a
deadlock) takes its delays from a ``Backoff`` and, where the attempts are bounded,
runs through ``RetryPolicy.call``. Jitter keeps many clients (or many workers)
that failed together from retrying together.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)
# a generator of its own: jitter needs no reproducible sequence, and drawing from the
# global one would disturb code that seeds it (Hypothesis checks that nothing does)
_JITTER = random.Random()


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delays ``base, 2*base, 4*base, ...`` capped at ``cap``, each drawn at random
    from its upper half ("equal jitter": spread out, yet never a hot loop)."""

    base: float = 0.05
    cap: float = 2.0

    def delay(self, failures: int) -> float:
        """The pause after the ``failures``-th consecutive failure (1-based)."""
        ceiling = min(self.cap, self.base * float(2 ** min(max(failures, 1) - 1, 62)))
        return ceiling / 2 + _JITTER.uniform(0.0, ceiling / 2)

    def delays(self, attempts: int | None = None) -> Iterator[float]:
        """The pauses between ``attempts`` tries (forever when None)."""
        failures = 0
        while attempts is None or failures < attempts - 1:
            failures += 1
            yield self.delay(failures)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Try a call up to ``attempts`` times while ``retryable(exc)`` says another try
    can help; the last failure (or one that is not retryable) is raised."""

    backoff: Backoff
    attempts: int | None  # None: until it works or is not retryable
    retryable: Callable[[BaseException], bool]

    async def call(self, what: str, fn: Callable[[], Awaitable[T]],
                   sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> T:
        """``sleep``: how to pause between tries (a paced caller's gives up its slot)."""
        pauses = self.backoff.delays(self.attempts)
        while True:
            try:
                return await fn()
            except Exception as exc:
                if not self.retryable(exc):
                    raise
                pause = next(pauses, None)
                if pause is None:
                    raise
                # the caller logs the final outcome once; a try that passes needs no line
                log.debug("%s failed, retrying in %.2f s: %s", what, pause, exc)
                await sleep(pause)
