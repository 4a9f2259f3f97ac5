"""ExpiringMap: O(1) bounded per-client state (issue 10 item 6, issue 14)."""

from __future__ import annotations

from exhook.expiring import ExpiringMap


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_key_is_found_once_within_its_ttl_and_not_after() -> None:
    clock = Clock()
    keys: ExpiringMap[str, bool] = ExpiringMap(60, 100, clock)
    keys.put("a", True)
    keys.put("b", True)
    clock.now += 30
    assert keys.pop("a") and not keys.pop("a")
    clock.now += 31
    assert not keys.pop("b")
    assert len(keys) == 0


def test_size_stays_bounded_by_dropping_the_oldest() -> None:
    clock = Clock()
    keys: ExpiringMap[str, bool] = ExpiringMap(60, 1000, clock)
    for i in range(50_000):
        keys.put(f"c{i}", True)
    assert len(keys) == 1000
    assert not keys.pop("c0") and keys.pop("c49999")


def test_adding_again_renews_a_key() -> None:
    clock = Clock()
    keys: ExpiringMap[str, bool] = ExpiringMap(60, 10, clock)
    keys.put("a", True)
    clock.now += 50
    keys.put("b", True)
    keys.put("a", True)
    clock.now += 20  # "a" renewed 20 s ago, "b" too; the first "a" would be 70 s old
    assert keys.pop("a") and keys.pop("b")


def test_expired_keys_are_dropped_as_time_passes_even_without_pops() -> None:
    clock = Clock()
    keys: ExpiringMap[str, bool] = ExpiringMap(60, 10_000, clock)
    for i in range(100):
        keys.put(f"old{i}", True)
    clock.now += 61
    keys.put("new", True)
    assert len(keys) == 1


def test_map_a_value_is_taken_once_while_it_lives() -> None:
    clock = Clock()
    m: ExpiringMap[str, str] = ExpiringMap(10, 100, clock)
    m.put("c1", "conn-a")
    clock.now += 9.9
    assert m.pop("c1") == "conn-a"
    assert m.pop("c1") is None


def test_map_an_expired_value_is_gone() -> None:
    clock = Clock()
    m: ExpiringMap[str, str] = ExpiringMap(10, 100, clock)
    m.put("c1", "conn-a")
    clock.now += 10
    assert m.pop("c1") is None


def test_map_expired_entries_are_dropped_when_new_ones_come_so_the_map_does_not_grow() -> None:
    clock = Clock()
    m: ExpiringMap[str, int] = ExpiringMap(10, 1000, clock)
    for i in range(50):
        m.put(f"old{i}", i)
    clock.now += 11
    m.put("new", 1)
    assert len(m) == 1


def test_map_bounded_the_oldest_goes_first_and_a_put_again_makes_an_entry_young() -> None:
    clock = Clock()
    m: ExpiringMap[str, int] = ExpiringMap(60, 3, clock)
    for key in ("a", "b", "c"):
        m.put(key, 1)
        clock.now += 1
    m.put("a", 2)  # now the youngest
    m.put("d", 1)  # over the bound: the oldest ("b") goes
    assert len(m) == 3
    assert m.pop("b") is None
    assert (m.pop("a"), m.pop("c"), m.pop("d")) == (2, 1, 1)
