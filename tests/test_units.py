"""The one duration and size parser: what EMQX's HOCON accepts means the same here."""

from __future__ import annotations

from datetime import timedelta

import pytest
from pyhocon import ConfigFactory  # type: ignore[import-untyped]

from exhook.units import format_duration, parse_duration_ms, parse_duration_s, parse_size_bytes


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("500ms", 500), ("1.5s", 1500), ("1m30s", 90_000), ("2h", 7_200_000), ("1d", 86_400_000),
        ("1h", 3_600_000), ("1w", 604_800_000), ("2S", 2000), ("1M", 60_000), ("0.5ms", 1), (".5s", 500),
        ("1h1m1s1ms", 3_661_001), (" 2s ", 2000), ("250", 250), (250, 250),
    ],
)
def test_durations_as_emqx_reads_them(text: str | int, ms: int) -> None:
    assert parse_duration_ms(text) == ms


def test_unquoted_values_pyhocon_made_a_timedelta_of() -> None:
    for text, ms in (("500ms", 500), ("2h", 7_200_000), ("5m", 300_000), ("10 seconds", 10_000)):
        value = ConfigFactory.parse_string(f"v = {text}")["v"]
        assert isinstance(value, timedelta)
        assert parse_duration_ms(value) == ms
    assert parse_duration_s(timedelta(hours=2)) == 7200


def test_a_bare_number_is_in_the_field_unit() -> None:
    assert parse_duration_ms(7200, unit_ms=1000) == 7_200_000
    assert parse_duration_s(7200) == 7200 and parse_duration_s("2h") == 7200 and parse_duration_s("90s") == 90


@pytest.mark.parametrize("bad", ["", "soon", "5 s s", "1.5", "-1s", "1x", "ms", "1s2", True, 1.5, [1], None])
def test_what_is_not_a_duration_says_so_without_a_python_repr(bad: object) -> None:
    with pytest.raises(ValueError, match=r"expected a duration such as 500ms, 1\.5s, 1m30s, 2h, 1d") as err:
        parse_duration_ms(bad)
    assert "timedelta" not in str(err.value) and "\n" not in str(err.value)


def test_a_negative_timedelta_and_fractions_of_seconds_are_refused() -> None:
    with pytest.raises(ValueError, match="cannot be negative"):
        parse_duration_ms(timedelta(seconds=-1))
    with pytest.raises(ValueError, match=r"expected whole seconds, got \"1500ms\" \(1500 ms\)"):
        parse_duration_s("1500ms")


@pytest.mark.parametrize("ms", [1, 500, 1000, 1500, 60_000, 90_000, 3_600_000, 86_400_000, 5])
def test_format_reads_back(ms: int) -> None:
    assert parse_duration_ms(format_duration(ms)) == ms


@pytest.mark.parametrize(
    ("text", "size"),
    [("1048576", 1 << 20), (4096, 4096), ("64MB", 64 << 20), ("64mb", 64 << 20), ("1GiB", 1 << 30),
     ("1GB", 1 << 30), ("512KB", 512 << 10), ("512 KiB", 512 << 10), ("10B", 10)],
)
def test_sizes_count_kb_as_emqx_does(text: str | int, size: int) -> None:
    assert parse_size_bytes(text) == size


@pytest.mark.parametrize("bad", ["", "big", "1.5GB", "1TB", "-1", True, 2.5])
def test_what_is_not_a_size_says_so(bad: object) -> None:
    with pytest.raises(ValueError, match="expected a size such as 1048576, 64MB, 1GiB"):
        parse_size_bytes(bad)
