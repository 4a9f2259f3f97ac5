"""The position merge shared by every backend's replay reads (storage/merge.py)."""

from __future__ import annotations

import random

from storage.merge import Source, merged_pages


class ListSource(Source[int]):
    def __init__(self, topic: str, positions: list[int]) -> None:
        super().__init__(topic)
        self.remaining = positions


def make_refill(chunk: int, calls: list[list[str]]):  # type: ignore[no-untyped-def]
    async def refill(sources: list[ListSource]) -> None:
        calls.append([s.topic for s in sources])
        for s in sources:
            s.buffer.extend(s.remaining[:chunk])
            s.remaining = s.remaining[chunk:]
            s.exhausted = not s.remaining

    return refill


async def collect(sources: list[ListSource], chunk: int, page_size: int) -> tuple[list[list[tuple[int, str]]],
                                                                                  list[list[str]]]:
    calls: list[list[str]] = []
    pages = [[(pos, s.topic) for pos, s in page]
             async for page in merged_pages(sources, make_refill(chunk, calls), lambda e: e, page_size)]
    return pages, calls


async def test_topics_come_out_in_one_global_position_order_in_bounded_pages() -> None:
    rng = random.Random(7)
    all_positions = rng.sample(range(1, 100_000), 2000)
    topics: dict[str, list[int]] = {f"t/{i}": [] for i in range(13)}
    for pos in all_positions:
        topics[f"t/{rng.randrange(13)}"].append(pos)
    sources = [ListSource(t, sorted(ps)) for t, ps in topics.items()]
    pages, _ = await collect(sources, chunk=7, page_size=50)
    flat = [item for page in pages for item in page]
    assert [pos for pos, _ in flat] == sorted(all_positions)
    assert all(pos in topics[topic] for pos, topic in flat)
    assert all(len(page) <= 50 for page in pages) and all(len(page) == 50 for page in pages[:-1])


async def test_first_refill_asks_for_every_source_at_once_then_only_for_dry_ones() -> None:
    sources = [ListSource("a", [1, 4, 5, 6]), ListSource("b", [2, 3]), ListSource("c", [])]
    pages, calls = await collect(sources, chunk=2, page_size=100)
    assert pages == [[(1, "a"), (2, "b"), (3, "b"), (4, "a"), (5, "a"), (6, "a")]]
    assert calls[0] == ["a", "b", "c"]
    assert all(len(call) == 1 for call in calls[1:])  # a dry source is refilled on its own


async def test_a_source_left_empty_but_not_exhausted_is_refilled_again() -> None:
    calls: list[str] = []
    source = Source[int]("x")
    rounds = iter([[], [], [5]])

    async def refill(sources: list[Source[int]]) -> None:
        calls.append("refill")
        got = next(rounds, None)
        if got is None:
            sources[0].exhausted = True
            return
        sources[0].buffer.extend(got)

    pages = [page async for page in merged_pages([source], refill, lambda e: e, 10)]
    assert [[pos for pos, _ in page] for page in pages] == [[5]]
    assert len(calls) == 4


async def test_nothing_stored_yields_no_page() -> None:
    pages, _ = await collect([ListSource("a", []), ListSource("b", [])], chunk=5, page_size=10)
    assert pages == []
