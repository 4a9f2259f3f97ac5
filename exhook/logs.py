"""Structured logging: one line per event, as ``key=value`` pairs or JSON.

A log call may name its event and carry fields through ``extra``::

    log.info("replay finished", extra={"event": "replay_done", "clientid": c, "count": n})

Both formats print the time, level, logger, message and those fields. Secrets from
the config are registered here and masked in every line, whatever logged them (a
driver's error text can quote a DSN or a password).

The service's lines are written by a thread of their own (``LogWriter``): a log call
on the event loop only hands its record over. Writing to stderr can block (a pipe
whose reader stalls: a container runtime's log driver, a paused terminal), and a
loop blocked in a write answers no hook, so every client waiting on one would hit
EMQX's request_timeout. If the writer falls ``QUEUE_LINES`` lines behind, further
lines are dropped, counted (``log_lines_dropped_total``) and reported in one line
once it catches up.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
from collections import deque
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

    def masked_entries(self, record: logging.LogRecord) -> dict[str, Any]:
        """The entries with every secret masked before they are escaped: escaped, a
        secret holding ``"`` or ``\\`` no longer matches itself in the line."""
        return {key: _masked(value, self.mask) for key, value in self._entries(record).items()}


def _masked(value: Any, mask: Callable[[str], str]) -> Any:
    """``value`` with ``mask`` applied to every text in it; what is neither text, a
    container nor a JSON scalar becomes its ``str`` (as the formatters print it), masked."""
    if isinstance(value, str):
        return mask(value)
    if isinstance(value, dict):
        return {_masked(k, mask) if isinstance(k, str) else k: _masked(v, mask) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_masked(item, mask) for item in value]
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return mask(str(value))


class KeyValueFormatter(_MaskingFormatter):
    """``ts=... level=info logger=exhook.server msg="listening" port=9000``"""

    def format(self, record: logging.LogRecord) -> str:
        # masked again as a whole: a credential pattern may span what was escaped apart
        entries = self.masked_entries(record)
        return self.mask(" ".join(f"{key}={_kv_value(value)}" for key, value in entries.items()))


class JsonFormatter(_MaskingFormatter):
    def format(self, record: logging.LogRecord) -> str:
        return self.mask(json.dumps(self.masked_entries(record), default=str, ensure_ascii=False))


def _kv_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if text and not any(c in text for c in ' "=\n\t\\'):
        return text
    # one line per event: newlines (tracebacks included) are escaped, never printed
    return json.dumps(text, ensure_ascii=False)


def line_formatter(fmt: str, secrets: Iterable[str], worker: int | None = None) -> logging.Formatter:
    """One ``fmt`` ("text" or "json") line per record, secrets masked."""
    return (JsonFormatter if fmt == "json" else KeyValueFormatter)(secrets, worker)


def stderr_handler(fmt: str, secrets: Iterable[str], worker: int | None = None) -> logging.Handler:
    """A handler writing one ``fmt`` line per record to stderr, on the caller's thread."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(line_formatter(fmt, secrets, worker))
    return handler


def raw_stderr() -> Callable[[str], None]:
    """A writer of text to the process's stderr file descriptor itself. Blocked on a
    stalled pipe, it holds no lock: through ``sys.stderr`` it would hold the stream's
    buffer lock, which the interpreter takes on its way out (a process that exits
    with lines still queued would abort or hang)."""
    stream = sys.stderr
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # an in-memory stream (a test's capture)
        def write_stream(text: str) -> None:
            stream.write(text)
            stream.flush()
        return write_stream
    stream.flush()  # what was written through it so far comes first

    def write_fd(text: str) -> None:
        data = text.encode("utf-8", "backslashreplace")
        while data:
            data = data[os.write(fd, data):]
    return write_fd


QUEUE_LINES = 10_000
_STOP_WAIT_S = 5.0


class _HandOver(logging.Handler):
    """Hands a record to the writer thread; never blocks, drops when ``max_lines`` wait."""

    def __init__(self, max_lines: int, count_dropped: Callable[[int], None]) -> None:
        super().__init__()
        self.lines: deque[logging.LogRecord | None] = deque()  # append/popleft: atomic, no lock
        self.wake = threading.Event()
        self._max = max_lines
        self._count_dropped = count_dropped
        self._lock = threading.Lock()
        self._unreported = 0

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.lines) >= self._max:
            self.drop(1)
            return
        try:
            # rendered now, while its arguments are as they were at the call (the
            # traceback stays for the writer's formatter: one process, no pickling)
            record.msg, record.args = record.getMessage(), None
        except Exception:  # a wrong format or argument: the line says so, masked like any other
            record.msg, record.args = f"unformattable log message {_safe_repr(record.msg)}", None
        self.lines.append(record)
        if not self.wake.is_set():  # a busy writer drains the whole deque: no wake-up per line
            self.wake.set()

    def drop(self, count: int) -> None:
        """Count lines that will not be written (the metric moves at once)."""
        with self._lock:
            self._unreported += count
        self._count_dropped(count)

    def take_unreported(self) -> int:
        with self._lock:
            dropped, self._unreported = self._unreported, 0
        return dropped


def _safe_repr(value: object) -> str:
    try:
        return repr(value)[:500]
    except Exception:
        return f"<{type(value).__name__}>"


class LogWriter:
    """The thread that formats the handed-over records and writes them (module docstring)."""

    def __init__(self, formatter: logging.Formatter, write: Callable[[str], None],
                 max_lines: int = QUEUE_LINES) -> None:
        self.formatter = formatter
        self.on_dropped: Callable[[int], None] = lambda count: None
        self.hand_over = _HandOver(max_lines, lambda count: self.on_dropped(count))
        self._write = write
        self._abandoned = False
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        lines, wake = self.hand_over.lines, self.hand_over.wake
        while True:
            wake.wait()
            wake.clear()  # before draining: a line handed over from now on sets it again
            while lines:
                record = lines.popleft()
                if record is None:
                    self._report_dropped()
                    return
                if self._abandoned:
                    self.hand_over.drop(1)
                else:
                    self._line(record)
            self._report_dropped()  # caught up: one line for what was dropped meanwhile

    def _line(self, record: logging.LogRecord) -> None:
        try:
            self._write(self.formatter.format(record) + "\n")
        except Exception:  # stderr closed, or a field the formatter cannot render
            self.hand_over.drop(1)

    def _report_dropped(self) -> None:
        dropped = self.hand_over.take_unreported()
        if dropped and not self._abandoned:
            record = logging.LogRecord("exhook.logs", logging.WARNING, __file__, 0,
                                       "%d log lines dropped: stderr did not keep up", (dropped,), None)
            record.event, record.dropped = "log_lines_dropped", dropped
            self._line(record)

    def close(self, timeout: float = _STOP_WAIT_S) -> bool:
        """Write what is queued, waiting at most ``timeout`` s for a stalled stderr.
        True when all was written; else the rest is dropped and the thread, stuck in a
        write that holds no lock, is left to end with the process."""
        self.hand_over.lines.append(None)
        self.hand_over.wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._abandoned = True
            return False
        return True

    def write_leftovers(self) -> None:
        """Write, on the caller's thread, lines handed over after the writer stopped."""
        lines = self.hand_over.lines
        while lines:
            record = lines.popleft()
            if record is not None:
                self._line(record)
        self._report_dropped()


_active: LogWriter | None = None


def setup_logging(
    level: str, fmt: str = "text", worker: int | None = None, secrets: Iterable[str] = (),
    write: Callable[[str], None] | None = None, max_lines: int = QUEUE_LINES,
) -> LogWriter:
    """Send every log line of this process (Python's warnings included) through a
    ``LogWriter`` to stderr (or ``write``); the caller stops it (``stop_logging``)
    when the process is done."""
    global _active
    stop_logging()
    writer = _active = LogWriter(line_formatter(fmt, secrets, worker), write or raw_stderr(), max_lines)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(writer.hand_over)
    root.setLevel(level.upper())
    logging.captureWarnings(True)
    # aiohttp logs every request at info: not an event that matters here
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    return writer


def count_dropped_lines(counter: Callable[[int], None]) -> None:
    """Have the active writer report dropped lines to ``counter`` too (a metric)."""
    if _active is not None:
        _active.on_dropped = counter


def stop_logging(timeout: float = _STOP_WAIT_S) -> None:
    """Write what is queued, then log on the caller's thread (the last lines of a
    process that is exiting), or, when stderr stayed stuck, not at all: nothing may
    keep the process from exiting."""
    global _active
    writer, _active = _active, None
    if writer is None:
        return
    written = writer.close(timeout)
    root = logging.getLogger()
    if writer.hand_over in root.handlers:
        root.removeHandler(writer.hand_over)
        direct: logging.Handler = logging.StreamHandler(sys.stderr) if written else logging.NullHandler()
        direct.setFormatter(writer.formatter)
        root.addHandler(direct)
    logging.captureWarnings(False)
    if written:
        writer.write_leftovers()  # handed over between the writer's end and the swap above
