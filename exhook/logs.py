"""Structured logging: one line per event, as ``key=value`` pairs or JSON.

A log call may name its event and carry fields through ``extra``::

    log.info("replay finished", extra={"event": "replay_done", "clientid": c, "count": n})

Both formats print the time, level, logger, message and those fields. Secrets from
the config are registered here and masked in every line, whatever logged them (a
driver's error text can quote a DSN or a password).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

MASK = "******"

# attributes every LogRecord has; anything else came from ``extra``
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS and not k.startswith("_")}


def _timestamp(record: logging.LogRecord) -> str:
    base = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{base}.{int(record.msecs):03d}Z"


# An HTTP credential wherever it is echoed (a REST error body, a driver's message):
# "Authorization: Basic dXNlcjpwYXNz", '"authorization": "Bearer ..."', "Basic dXNl..."
_CREDENTIAL = re.compile(r"(?i)\b(basic|bearer)(\s+|%20)[A-Za-z0-9+/=._~-]{8,}")


def redactor(secrets: Iterable[str]) -> Callable[[str], str]:
    """A function replacing every given secret in a text by ``MASK``, and any HTTP
    Basic/Bearer credential whatever it holds."""
    # longest first, so a secret containing another is masked whole
    ordered = sorted({s for s in secrets if s}, key=len, reverse=True)

    def redact(text: str) -> str:
        for secret in ordered:
            text = text.replace(secret, MASK)
        return _CREDENTIAL.sub(lambda m: f"{m.group(1)} {MASK}", text)

    return redact


class _MaskingFormatter(logging.Formatter):
    def __init__(self, secrets: Iterable[str], worker: int | None) -> None:
        super().__init__()
        self.mask = redactor(secrets)
        self._worker = worker

    def _entries(self, record: logging.LogRecord) -> dict[str, Any]:
        entries: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        if self._worker is not None:
            entries["worker"] = self._worker
        entries["msg"] = record.getMessage()
        entries.update(_fields(record))
        if record.exc_info:
            entries["exc"] = self.formatException(record.exc_info)
        return entries


class KeyValueFormatter(_MaskingFormatter):
    """``ts=... level=info logger=exhook.server msg="listening" port=9000``"""

    def format(self, record: logging.LogRecord) -> str:
        return self.mask(" ".join(f"{key}={_kv_value(value)}" for key, value in self._entries(record).items()))


class JsonFormatter(_MaskingFormatter):
    def format(self, record: logging.LogRecord) -> str:
        return self.mask(json.dumps(self._entries(record), default=str, ensure_ascii=False))


def _kv_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if text and not any(c in text for c in ' "=\n\t\\'):
        return text
    # one line per event: newlines (tracebacks included) are escaped, never printed
    return json.dumps(text, ensure_ascii=False)


def stderr_handler(fmt: str, secrets: Iterable[str], worker: int | None = None) -> logging.Handler:
    """A handler writing one ``fmt`` ("text" or "json") line per record to stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter((JsonFormatter if fmt == "json" else KeyValueFormatter)(secrets, worker))
    return handler


def setup_logging(
    level: str, fmt: str = "text", worker: int | None = None, secrets: Iterable[str] = ()
) -> None:
    handler = stderr_handler(fmt, secrets, worker)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # aiohttp logs every request at info: not an event that matters here
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
