"""One pipeline round trip whose replies are read by handle, not by position.

``Round.add`` queues a command for the op it serves and returns its ``Reply``; once
the round trip is done each handle holds its own reply, so a write phase reads
"the tombstone check of this re-key" rather than "result number 3*i + base".
``refusals`` sorts the error replies: a transient or set-up failure anywhere fails
the whole round (the caller retries the batch); a refusal that names one op's data
is returned by op, for the write path to set that op aside.
"""

from __future__ import annotations

from typing import Any

from storage.base import StoreConfigError, StoreError
from storage.errors import first_line, one_line
from storage.redis.errors import Kind, kind_of, wrap
from storage.redis.keys import Cmd

_UNSENT: Any = object()


class Reply:
    """One command of a round and, once the round ran, its reply (an exception
    object when the server refused this command)."""

    __slots__ = ("cmd", "op", "value")

    def __init__(self, op: int | None, cmd: Cmd) -> None:
        self.op = op  # index of the op in the batch (None: shared by the batch)
        self.cmd = cmd
        self.value: Any = _UNSENT

    @property
    def done(self) -> bool:
        """Sent and carried out."""
        return self.value is not _UNSENT and not isinstance(self.value, BaseException)

    @property
    def refused(self) -> bool:
        return isinstance(self.value, BaseException)


class Round:
    """Commands sent together in one pipeline round trip, in the order added."""

    __slots__ = ("replies", "what")

    def __init__(self, what: str) -> None:
        self.what = what
        self.replies: list[Reply] = []

    def add(self, op: int | None, *cmd: Any) -> Reply:
        reply = Reply(op, cmd)
        self.replies.append(reply)
        return reply

    def then(self, *others: Round) -> Round:
        """This round followed by ``others`` as one round trip (the same handles)."""
        for other in others:
            self.replies += other.replies
        return self

    def __bool__(self) -> bool:
        return bool(self.replies)

    @property
    def commands(self) -> list[Cmd]:
        return [r.cmd for r in self.replies]

    def settle(self, values: list[Any]) -> None:
        for reply, value in zip(self.replies, values, strict=True):
            reply.value = value


def refusals(rnd: Round) -> dict[int, tuple[str, str]]:
    """``{op index: (reason, detail)}`` of the ops whose data the server refused;
    raises ``StoreError`` / ``StoreConfigError`` if anything else failed."""
    setup: BaseException | None = None
    refused: dict[int, tuple[str, str]] = {}
    for reply in rnd.replies:
        exc = reply.value
        if not isinstance(exc, BaseException):
            continue
        kind = kind_of(exc)
        if kind is Kind.TRANSIENT:
            raise StoreError(f"redis {rnd.what}: {reply.cmd[0]}: {one_line(exc)}")
        if kind is Kind.SETUP or reply.op is None:
            setup = setup or exc
        else:
            refused.setdefault(reply.op, (kind.value, f"redis {reply.cmd[0]}: {first_line(exc)}"))
    if setup is not None and kind_of(setup) is Kind.SETUP:
        raise wrap(setup, rnd.what)
    if setup is not None:  # not one op's doing: someone changed a key of the service's own
        raise StoreConfigError(f"redis {rnd.what}: a key of the service holds another type: {first_line(setup)}")
    return refused


def or_empty(value: Any, empty: Any, what: str) -> Any:
    """A reply about a topic's zset: ``empty`` when the key holds another type (a
    topic spelled like a stored message's b62 id names that message's hash, which
    holds no messages of the topic); any other refusal raises."""
    if isinstance(value, BaseException):
        if kind_of(value) is not Kind.WRONG_TYPE:
            raise wrap(value, what)
        return empty
    return value


def value(reply: Reply, what: str) -> Any:
    """The reply's value; the store error of a refusal is raised."""
    if isinstance(reply.value, BaseException):
        raise wrap(reply.value, what)
    return reply.value
