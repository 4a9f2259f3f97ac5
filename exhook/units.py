"""The one parser of durations and sizes, for every config field and the CLI.

It accepts what EMQX's own HOCON accepts (``hocon_postprocess:duration/1`` and
``bytesize/1``), so a value copied from ``emqx.conf`` means the same here:

* durations: one or more ``<number><unit>`` parts, units ``ms``, ``s``, ``m``, ``h``,
  ``d``, ``w`` (case-insensitive), decimals allowed: ``500ms``, ``1.5s``, ``1m30s``,
  ``2h``, ``1d``; a bare integer is in the field's own unit (``batch_time = 100`` is
  100 ms as in the Erlang plugin, ``message_ttl = 7200`` is 7200 s). pyhocon turns an
  unquoted ``500ms`` or ``2h`` into a ``timedelta`` itself, which is taken as it is.
* sizes: an integer of bytes, or ``<integer><unit>`` with ``KB``/``MB``/``GB`` as EMQX
  counts them (1024-based, so ``64MB`` = 64 MiB) and ``KiB``/``MiB``/``GiB`` meaning the same.

Each parser raises ``ValueError`` with a short text; the config and the CLI put the
field's name in front of it.
"""

from __future__ import annotations

import re
from datetime import timedelta
from decimal import ROUND_HALF_UP, Decimal

_MS_PER_UNIT = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
# "ms" before "m": the alternation is tried in order
_PART = re.compile(r"(\d+(?:\.\d+)?|\.\d+)(ms|[smhdw])", re.IGNORECASE)
_BYTES_PER_UNIT = {"": 1, "b": 1, "kb": 1024, "mb": 1024**2, "gb": 1024**3,
                   "kib": 1024, "mib": 1024**2, "gib": 1024**3}
_SIZE = re.compile(r"(\d+)\s*([kmg]i?b|b)?", re.IGNORECASE)

DURATION_FORMS = '500ms, 1.5s, 1m30s, 2h, 1d'
SIZE_FORMS = '1048576, 64MB, 1GiB'


def parse_duration_ms(value: object, unit_ms: int = 1) -> int:
    """A duration in milliseconds; a bare integer counts ``unit_ms`` milliseconds.
    ``ValueError`` when ``value`` is not a duration (or is negative)."""
    if isinstance(value, timedelta):
        if value < timedelta(0):
            raise ValueError(f"a duration cannot be negative, got {_shown(value)}")
        return round(value / timedelta(milliseconds=1))
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"expected a duration such as {DURATION_FORMS}, got {_shown(value)}")
    text = str(value).strip()
    if text.isdigit():
        return int(text) * unit_ms
    if not text or _PART.sub("", text):
        raise ValueError(f"expected a duration such as {DURATION_FORMS}, got {_shown(value)}")
    total = sum((Decimal(number) * _MS_PER_UNIT[unit.lower()] for number, unit in _PART.findall(text)), Decimal(0))
    return int(total.to_integral_value(rounding=ROUND_HALF_UP))  # as Erlang's round/1 in EMQX


def parse_duration_s(value: object) -> int:
    """A duration in whole seconds (a bare integer is seconds): ``2h`` -> 7200."""
    ms = parse_duration_ms(value, unit_ms=1000)
    if ms % 1000:
        raise ValueError(f"expected whole seconds, got {_shown(value)} ({ms} ms)")
    return ms // 1000


def parse_size_bytes(value: object) -> int:
    """A size in bytes: ``1048576``, ``64MB`` (= 64 MiB, as in EMQX), ``1GiB``."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"expected a size such as {SIZE_FORMS}, got {_shown(value)}")
    match = _SIZE.fullmatch(str(value).strip())
    if not match:
        raise ValueError(f"expected a size such as {SIZE_FORMS}, got {_shown(value)}")
    return int(match.group(1)) * _BYTES_PER_UNIT[(match.group(2) or "").lower()]


def format_duration(ms: int) -> str:
    """The shortest exact text for ``ms`` that both EMQX and this parser read back."""
    for unit in ("d", "h", "m", "s"):
        size = _MS_PER_UNIT[unit]
        if ms and ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


def _shown(value: object) -> str:
    """The value as the operator wrote it (never a Python repr such as timedelta(...))."""
    if isinstance(value, timedelta):
        return format_duration(round(value / timedelta(milliseconds=1)))
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict) or hasattr(value, "items"):
        return "an object"
    return str(value)
