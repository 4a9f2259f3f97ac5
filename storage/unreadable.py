"""Stored messages a read cannot turn into a message (written by another tool, or
damaged): every backend's reader skips such a row or hash, so that the topic's other
messages are still replayed, and says so through one ``SkippedRows`` of its own."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TypeVar

from storage.ratelog import RateLimitedLog

log = logging.getLogger(__name__)

Row = TypeVar("Row")
Message = TypeVar("Message")


# Called with the backend's name for every row skipped (the service counts them in a
# metric; ``storage`` knows nothing of it). Added and removed by whoever listens.
listeners: list[Callable[[str], None]] = []


class Unreadable(ValueError):
    """A stored row that cannot be a message."""


class SkippedRows:
    """Rows a backend's reads skipped as unreadable: ``count`` since start, and one
    warning line, at once and then at most one a minute (every replay of the topic
    meets the row again), saying how many rows it stands for."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.count = 0
        self._logs = RateLimitedLog()

    def skip(self, row: object, topic: object, exc: Exception) -> None:
        self.count += 1
        for listener in listeners:
            listener(self.backend)
        if since := self._logs.note():
            log.warning("%s: skipping unreadable stored message %r of %r: %s (%d skipped since the last line)",
                        self.backend, row, topic, exc, since)

    def readable(self, rows: Iterable[Row], convert: Callable[[Row], Message],
                 where: Callable[[Row], tuple[object, object]]) -> list[Message]:
        """``convert`` of each row; a row it refuses (``Unreadable``, or a value a
        conversion refuses: TypeError, ValueError, ArithmeticError) is skipped, as
        ``where`` names it (row id, topic), never failing the page."""
        out: list[Message] = []
        for row in rows:
            try:
                out.append(convert(row))
            except (TypeError, ValueError, ArithmeticError) as exc:
                self.skip(*where(row), exc)
        return out
