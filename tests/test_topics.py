from __future__ import annotations

import pytest

from exhook.topics import TopicError, TopicSet, literal_prefix, matches, real_filter, validate_filter


@pytest.mark.parametrize(
    ("flt", "topic", "expected"),
    [
        ("a/b", "a/b", True),
        ("a/+", "a/b", True),
        ("a/+", "a/b/c", False),
        ("a/#", "a", True),
        ("a/#", "a/b/c", True),
        ("+/+", "a/b", True),
        ("+", "/", False),
        ("+/+", "/", True),
        ("#", "$SYS/x", False),
        ("+/x", "$foo/x", False),
        ("$foo/#", "$foo/x", True),
        ("a/+/c", "a//c", True),
    ],
)
def test_matches(flt: str, topic: str, expected: bool) -> None:
    assert matches(flt, topic) is expected


@pytest.mark.parametrize("bad", ["", "a/#/b", "a#", "a/b+", "x\x00"])
def test_invalid_filters(bad: str) -> None:
    with pytest.raises(TopicError):
        validate_filter(bad)


def test_shared_subscription_prefixes() -> None:
    assert real_filter("$share/g1/a/+/c") == "a/+/c"
    assert real_filter("$queue/a/b") == "a/b"
    assert real_filter("a/b") == "a/b"
    with pytest.raises(TopicError):
        real_filter("$share/g1")


def test_literal_prefix() -> None:
    assert literal_prefix("a/b/+/c") == "a/b/"
    # "a/#" also matches "a" itself: every matching topic starts with "a", not "a/"
    assert literal_prefix("a/#") == "a"
    assert literal_prefix("a/b/#") == "a/b" and literal_prefix("a/+/#") == "a/"
    assert literal_prefix("#") == ""
    assert literal_prefix("a/b") == "a/b"


def test_topic_set_match_and_overlap() -> None:
    tracked = TopicSet(["t/#", "x/+/y"])
    assert tracked.match("t/1") and tracked.match("x/1/y")
    assert not tracked.match("x/1/z") and not tracked.match("other")
    assert tracked.match("t/1")  # cached answer stays right
    assert tracked.overlaps("#") and tracked.overlaps("t/+") and tracked.overlaps("+/a/y")
    assert not tracked.overlaps("other/#") and not tracked.overlaps("x/a/z")
    assert not TopicSet([])
