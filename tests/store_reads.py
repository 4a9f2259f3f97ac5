"""Reading a store's messages back, as the backend tests check them."""

from __future__ import annotations

from storage.base import Store
from storage.model import StoredMessage


async def read_all(store: Store, ranges: dict[str, tuple[float | None, float]],
                   page_size: int = 100) -> list[StoredMessage]:
    """Every message in ``ranges``, page by page; every page holds 1 to ``page_size`` messages."""
    out: list[StoredMessage] = []
    async for page in store.read_messages(ranges, page_size):
        assert 0 < len(page) <= page_size
        out.extend(page)
    return out
