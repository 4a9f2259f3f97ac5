"""A store that may not be reachable yet.

The service starts even when its database is down (the broker must still get
answers): until ``open`` has succeeded, every operation fails fast with
``StoreError`` naming why the last open failed, which the writer and the background
jobs already retry. Every failed operation is also reported to ``on_failure`` (the
service counts them by operation).

The gate forwards every operation of the ``Store`` interface by name, so a new
store method needs no change here.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

from storage.base import Store, StoreError, WriteRejected
from storage.errors import first_line


class StoreNotOpen(StoreError):
    """The store has not been opened yet; the text says why the last try failed."""


# Operations not reported as failures: readiness reports a failing ping itself.
_UNCOUNTED = frozenset({"ping"})
# every operation of the interface, those with a default body too
_OPERATIONS = frozenset(name for name, value in vars(Store).items()
                        if callable(value) and not name.startswith("_")) - {"open", "close"}


class GatedStore:
    def __init__(self, inner: Store, on_failure: Callable[[str], None] = lambda operation: None) -> None:
        self.inner = inner
        self.name = inner.name
        self.is_open = False
        self.open_error = ""
        self._on_failure = on_failure

    @property
    def store(self) -> Store:
        """This gate seen as the ``Store`` it forwards to (what the service uses)."""
        return cast(Store, self)

    async def open(self) -> None:
        try:
            await self.inner.open()
        except StoreError as exc:
            # readiness and every failing call then say why, not only "not connected"
            self.open_error = first_line(exc)
            raise
        self.is_open = True
        self.open_error = ""

    async def close(self) -> None:
        self.is_open = False
        await self.inner.close()

    def _check(self) -> Store:
        if not self.is_open:
            why = f" ({self.open_error})" if self.open_error else ""
            raise StoreNotOpen(f"{self.name} is not connected yet{why}")
        return self.inner

    def __getattr__(self, operation: str) -> Any:
        if operation not in _OPERATIONS:
            return getattr(self.inner, operation)
        counted = operation not in _UNCOUNTED
        if inspect.iscoroutinefunction(getattr(Store, operation)):
            gated = self._gated_call(operation, counted)
        else:
            gated = self._gated_pages(operation, counted)  # read_messages: an async iterator
        setattr(self, operation, gated)  # built once: later lookups find it without __getattr__
        return gated

    def _gated_call(self, operation: str, counted: bool) -> Callable[..., Any]:
        async def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return await getattr(self._check(), operation)(*args, **kwargs)
            except WriteRejected:
                raise  # an op the store refuses for good, not a failing store (writes_rejected_total)
            except StoreError:
                if counted:
                    self._on_failure(operation)
                raise

        return call

    def _gated_pages(self, operation: str, counted: bool) -> Callable[..., AsyncIterator[Any]]:
        async def pages(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
            try:
                inner_pages = getattr(self._check(), operation)(*args, **kwargs)
            except StoreError:
                if counted:
                    self._on_failure(operation)
                raise
            try:
                async for page in inner_pages:
                    yield page
            except StoreError:
                if counted:
                    self._on_failure(operation)
                raise
            finally:
                await inner_pages.aclose()

        return pages
