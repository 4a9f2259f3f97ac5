from __future__ import annotations

from exhook.expiring import ExpiringMap


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_value_is_taken_once_while_it_lives() -> None:
    clock = Clock()
    m: ExpiringMap[str, str] = ExpiringMap(10, 100, clock)
    m.put("c1", "conn-a")
    clock.now += 9.9
    assert m.pop("c1") == "conn-a"
    assert m.pop("c1") is None


def test_an_expired_value_is_gone() -> None:
    clock = Clock()
    m: ExpiringMap[str, str] = ExpiringMap(10, 100, clock)
    m.put("c1", "conn-a")
    clock.now += 10
    assert m.pop("c1") is None


def test_expired_entries_are_dropped_when_new_ones_come_so_the_map_does_not_grow() -> None:
    clock = Clock()
    m: ExpiringMap[str, int] = ExpiringMap(10, 1000, clock)
    for i in range(50):
        m.put(f"old{i}", i)
    clock.now += 11
    m.put("new", 1)
    assert len(m) == 1


def test_bounded_the_oldest_goes_first_and_a_put_again_makes_an_entry_young() -> None:
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
