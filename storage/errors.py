"""An exception as text fit for one log field or one readiness reason."""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """The first line of the exception's text, or its type's name if it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def one_line(exc: BaseException) -> str:
    """``Type: first line`` (drivers' messages alone often do not say what failed)."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def joined(text: str, limit: int = 500) -> str:
    """Every non-empty line of ``text`` joined into one, at most ``limit`` characters
    (a driver's multi-line message kept whole on one log line)."""
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return " ".join(lines)[:limit]
