"""Who counts as an active client for group commit (exhook/group_commit.py)."""

from __future__ import annotations

from exhook.group_commit import ActiveSources, others_may_come


def test_active_clients_are_those_seen_within_the_window() -> None:
    now = [100.0]
    active = ActiveSources(window_s=0.05, clock=lambda: now[0])
    for client in ("a", "b", "c"):
        active.note(client)
    assert active.count() == 3
    now[0] += 0.04
    active.note("a")  # a renews itself
    now[0] += 0.02  # b and c are 60 ms old now
    active.note("d")
    assert active.count() == 2  # a (20 ms) and d


def test_a_batch_waits_only_for_clients_not_in_it() -> None:
    assert not others_may_come(active=1, sources_in_batch=1)
    assert others_may_come(active=4, sources_in_batch=1)
    assert not others_may_come(active=4, sources_in_batch=4)
