"""How a batch of write ops is cut into runs of one kind, for the SQL backends.

A run of one kind is one statement (a multi-row INSERT, one ``DELETE ... IN``), and
on MySQL every statement is a round trip. Cutting the batch where the kind changes
turns the mixed load's alternation (a publish's save, another message's ack delete,
a save, ...) into one statement per op. So the ops are regrouped by kind, in the
order saves, re-keys, deletes, pending-replay drops, keeping their order within a
kind. That gives the same outcome as the batch's order whenever each op touches only
the rows of its own message id (the backend says so) and no two ops about the same
message (or the same pending replay) swap places; a batch where they would
(e.g. a delete, then a save of that id again) keeps its order and is cut where the
kind changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import groupby

from storage.model import DeleteMessage, DropPendingReplay, RekeyMessage, SaveMessage, WriteOp

# the order of the kinds within a regrouped batch: a message's save comes before
# its re-key, a re-key before the ack that deletes the new id
_RANK: dict[type, int] = {SaveMessage: 0, RekeyMessage: 1, DeleteMessage: 2, DropPendingReplay: 3}

Run = tuple[type, list[int]]  # the kind, and the indexes in the batch of its ops


def runs(ops: Sequence[WriteOp], regroup: bool = True) -> list[Run]:
    """``ops`` as runs of one kind, each a list of indexes into ``ops``, in an order
    with the same outcome as ``ops`` in their order. ``regroup=False``: the backend's
    statements may touch rows of other messages (an operator's SQL template keyed by
    topic), so the runs are only cut where the kind changes."""
    if regroup and _regroupable(ops):
        order = sorted(range(len(ops)), key=lambda i: _RANK[type(ops[i])])  # stable
    else:
        order = list(range(len(ops)))
    return [(kind, list(indexes)) for kind, indexes in groupby(order, key=lambda i: type(ops[i]))]


def _regroupable(ops: Sequence[WriteOp]) -> bool:
    """Would no two ops about the same thing change places when sorted by kind?"""
    latest: dict[object, int] = {}  # what an op is about -> highest rank of an op about it so far
    for op in ops:
        rank = _RANK[type(op)]
        for key in _about(op):
            if latest.get(key, rank) > rank:
                return False
            latest[key] = rank
    return True


def _about(op: WriteOp) -> tuple[object, ...]:
    if isinstance(op, SaveMessage):
        return (op.message.msgid,)
    if isinstance(op, DeleteMessage):
        return (op.msgid,)
    if isinstance(op, RekeyMessage):
        return (op.old_id, op.new_id)
    return (("pending", op.topic, op.digest),)
