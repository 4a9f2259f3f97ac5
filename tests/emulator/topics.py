"""MQTT topic names and filters as EMQX's ``emqx_topic`` treats them.

Written for the emulator on purpose (it does not import the product's ``exhook.topics``), so a bug in the
product's matcher cannot hide behind the same bug in the test broker.
"""

from __future__ import annotations

MAX_TOPIC_BYTES = 65535


class TopicError(ValueError):
    """A topic name or filter that the broker rejects."""


def validate_name(topic: object) -> str:
    """A topic name one may publish to (``emqx_topic:validate(name, T)``): no wildcards."""
    if not isinstance(topic, str) or topic == "":
        raise TopicError("empty topic name")
    if len(topic.encode()) > MAX_TOPIC_BYTES:
        raise TopicError("topic name too long")
    if "\x00" in topic:
        raise TopicError("topic name contains NUL")
    if "+" in topic or "#" in topic:
        raise TopicError(f"wildcards are not allowed in a topic name: {topic!r}")
    return topic


def validate_filter(flt: object) -> str:
    """A plain (non-shared) topic filter: ``#`` only as the whole last level, ``+`` only as a whole level."""
    if not isinstance(flt, str) or flt == "":
        raise TopicError("empty topic filter")
    if len(flt.encode()) > MAX_TOPIC_BYTES:
        raise TopicError("topic filter too long")
    if "\x00" in flt:
        raise TopicError("topic filter contains NUL")
    levels = flt.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise TopicError(f"bad '#' in topic filter {flt!r}")
        if "+" in level and level != "+":
            raise TopicError(f"bad '+' in topic filter {flt!r}")
    return flt


def parse_subscription(flt: object) -> tuple[str | None, str]:
    """``"$share/g/a/b"`` -> ``("g", "a/b")``; ``"a/b"`` -> ``(None, "a/b")``; raises TopicError when invalid.

    ``$queue/a/b`` is EMQX's legacy spelling of ``$share/$queue/a/b``.
    """
    if not isinstance(flt, str):
        raise TopicError("topic filter must be a string")
    if flt.startswith("$share/"):
        parts = flt.split("/", 2)
        if len(parts) < 3 or not parts[1] or not parts[2]:
            raise TopicError(f"malformed shared subscription {flt!r}")
        group = parts[1]
        if "+" in group or "#" in group:
            raise TopicError(f"wildcard in share group of {flt!r}")
        return group, validate_filter(parts[2])
    if flt.startswith("$queue/"):
        return "$queue", validate_filter(flt[len("$queue/") :])
    return None, validate_filter(flt)


def is_wildcard(flt: str) -> bool:
    return "+" in flt or "#" in flt


def match(topic: str, flt: str) -> bool:
    """``emqx_topic:match(Name, Filter)``: wildcards in the first level never match a ``$``-topic."""
    if topic == flt:
        return True
    if not is_wildcard(flt):
        return False
    if topic.startswith("$") and flt[:1] in ("+", "#"):
        return False
    names = topic.split("/")
    words = flt.split("/")
    for i, word in enumerate(words):
        if word == "#":
            return True
        if i >= len(names):
            return False
        if word != "+" and word != names[i]:
            return False
    return len(names) == len(words)
