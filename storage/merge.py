"""The one merge of per-topic reads into position (arrival) order.

A replay of a wildcard filter reads several topics, each stored in its own
position order, and must deliver them in one global order without holding them
all in memory. Every backend reads the same way: a ``Source`` per topic buffers a
few entries (ids or index members, no payloads), the heads of all sources sit in a
heap, and the smallest is taken until a page is full; a source whose buffer runs
dry is refilled before the next entry is taken, so the heap always holds the head
of every source that may have more. The backend supplies how to refill sources (as
many at once as it likes: one query or pipeline for all) and the sort key of an
entry; it then loads each page's rows itself.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

E = TypeVar("E")


class Source(Generic[E]):
    """One topic's part of a merged read: ``buffer`` holds its next entries in
    position order; ``exhausted`` once the store has no more of them."""

    __slots__ = ("buffer", "exhausted", "topic")

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.buffer: deque[E] = deque()
        self.exhausted = False


S = TypeVar("S", bound=Source[Any])


async def merged_pages(
    sources: Sequence[S],
    refill: Callable[[list[S]], Awaitable[None]],
    key: Callable[[Any], Any],
    page_size: int,
) -> AsyncIterator[list[tuple[Any, S]]]:
    """Pages of ``(entry, source)`` in ascending ``key(entry)`` across all sources,
    at most ``page_size`` each. ``refill`` appends to the buffers of the sources it
    is given and marks the ones that have no more as exhausted; a source it leaves
    empty but not exhausted is refilled again (its entries vanished meanwhile)."""
    heap: list[tuple[Any, int]] = []
    dry = list(range(len(sources)))  # sources to refill before the next entry is taken
    while True:
        page: list[tuple[Any, S]] = []
        while len(page) < page_size:
            while dry:
                await refill([sources[i] for i in dry])
                again = []
                for i in dry:
                    buffer = sources[i].buffer
                    if buffer:
                        heapq.heappush(heap, (key(buffer[0]), i))
                    elif not sources[i].exhausted:
                        again.append(i)
                dry = again
            if not heap:
                break
            _, index = heapq.heappop(heap)
            source = sources[index]
            page.append((source.buffer.popleft(), source))
            if source.buffer:
                heapq.heappush(heap, (key(source.buffer[0]), index))
            elif not source.exhausted:
                dry.append(index)
        if not page:
            return
        yield page
