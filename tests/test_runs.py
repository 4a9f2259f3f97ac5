"""storage.runs: how a batch is cut into runs of one kind for the SQL backends."""

from __future__ import annotations

from storage.model import DeleteMessage, DropPendingReplay, RekeyMessage, SaveMessage, StoredMessage, WriteOp
from storage.runs import runs


def save(msgid: str) -> SaveMessage:
    return SaveMessage(StoredMessage(msgid, "c", "t", 1, False, b"", 1))


def delete(msgid: str) -> DeleteMessage:
    return DeleteMessage(msgid, "t")


def kinds(ops: list[WriteOp]) -> list[tuple[str, list[int]]]:
    return [(kind.__name__, indexes) for kind, indexes in runs(ops)]


def test_the_mixed_loads_alternation_becomes_one_run_per_kind() -> None:
    ops: list[WriteOp] = [save("a"), delete("x"), save("b"), delete("y"), save("c")]
    assert kinds(ops) == [("SaveMessage", [0, 2, 4]), ("DeleteMessage", [1, 3])]


def test_a_save_and_its_own_delete_in_one_batch_still_regroup() -> None:
    ops: list[WriteOp] = [save("a"), delete("a"), save("b")]
    assert kinds(ops) == [("SaveMessage", [0, 2]), ("DeleteMessage", [1])]


def test_a_delete_then_a_save_of_that_id_keep_their_order() -> None:
    # sorting would delete the message saved again: the batch is cut where the kind changes
    ops: list[WriteOp] = [save("b"), delete("a"), save("a")]
    assert kinds(ops) == [("SaveMessage", [0]), ("DeleteMessage", [1]), ("SaveMessage", [2])]


def test_a_replays_rekey_goes_before_the_ack_of_the_new_id_and_after_saves() -> None:
    ops: list[WriteOp] = [RekeyMessage("o1", "n1", "t"), save("p"), delete("n1"), RekeyMessage("o2", "n2", "t"),
                          delete("n2"), DropPendingReplay("t", "d", "o3")]
    assert kinds(ops) == [("SaveMessage", [1]), ("RekeyMessage", [0, 3]), ("DeleteMessage", [2, 4]),
                          ("DropPendingReplay", [5])]


def test_an_ack_that_overtook_its_rekey_keeps_its_place() -> None:
    # the tombstone order (delete of the new id, then its re-key) must be kept
    ops: list[WriteOp] = [delete("n1"), RekeyMessage("o1", "n1", "t"), save("p")]
    assert kinds(ops) == [("DeleteMessage", [0]), ("RekeyMessage", [1]), ("SaveMessage", [2])]


def test_the_old_id_counts_too() -> None:
    ops: list[WriteOp] = [RekeyMessage("o1", "n1", "t"), save("o1")]
    assert kinds(ops) == [("RekeyMessage", [0]), ("SaveMessage", [1])]


def test_empty_and_single() -> None:
    assert runs([]) == []
    assert kinds([delete("a")]) == [("DeleteMessage", [0])]


def test_a_backend_whose_statements_reach_other_rows_keeps_the_order() -> None:
    ops: list[WriteOp] = [save("a"), delete("x"), save("b")]
    assert kinds(ops) == [("SaveMessage", [0, 2]), ("DeleteMessage", [1])]
    assert [(k.__name__, i) for k, i in runs(ops, regroup=False)] == [
        ("SaveMessage", [0]), ("DeleteMessage", [1]), ("SaveMessage", [2])]
