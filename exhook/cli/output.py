"""Plain-text output of the operator commands: tab-separated records on stdout, notes and
progress on stderr. Free text (topics, payloads) is escaped so that one record is one line
and tabs only ever separate columns."""

from __future__ import annotations

import sys
import time
from typing import TextIO

PREVIEW_CHARS = 48
PROGRESS_EVERY = 5000  # messages between two progress lines
_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}


class CliError(Exception):
    """A command failed: ``str()`` is the one line to print, ``code`` the exit status
    (1 = the operation failed, 2 = configuration or usage error)."""

    def __init__(self, text: str, code: int = 1) -> None:
        super().__init__(text)
        self.code = code


def escape(text: str) -> str:
    """Backslash-escape tabs, newlines and other control characters."""
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")
    return "".join(out)


def preview(payload: bytes, limit: int = PREVIEW_CHARS) -> str:
    """The start of a payload: escaped text if it is UTF-8, else ``hex:`` and its bytes."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        head = payload[: limit // 2].hex()
        return f"hex:{head}" + ("..." if len(payload) > limit // 2 else "")
    cut = escape(text[:limit])
    return cut + ("..." if len(text) > limit else "")


def iso_ms(timestamp_ms: int) -> str:
    """Epoch milliseconds as UTC ISO 8601 (``-`` when unknown)."""
    if timestamp_ms <= 0:
        return "-"
    seconds, ms = divmod(int(timestamp_ms), 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{ms:03d}Z"


def record(*columns: object, out: TextIO | None = None) -> None:
    print("\t".join(str(c) for c in columns), file=out or sys.stdout)


class Progress:
    """Progress lines on stderr: every ``PROGRESS_EVERY`` messages and once per topic of a
    long operation; ``quiet`` silences them (errors are printed regardless)."""

    def __init__(self, quiet: bool = False, every: int | None = None) -> None:
        self.quiet = quiet
        self.every = max(1, every or PROGRESS_EVERY)

    def note(self, text: str) -> None:
        if not self.quiet:
            print(f"offline-exhook: {text}", file=sys.stderr, flush=True)

    def advance(self, before: int, after: int, text: str) -> None:
        """Print ``text`` when the count went past a multiple of ``every``."""
        if after // self.every > before // self.every:
            self.note(text)


def fail(text: str) -> None:
    print(f"offline-exhook: {text}", file=sys.stderr, flush=True)
