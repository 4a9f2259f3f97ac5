"""A column of the operator's tables as ``information_schema`` describes it, and
whether a value fits it (checked before a write, so that the server never has to
refuse a batch for one value)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_INT_BITS = {"tinyint": 8, "smallint": 16, "mediumint": 24, "int": 32, "integer": 32, "bigint": 64}
TEMPORAL_TYPES = frozenset({"datetime", "timestamp", "date"})
NUMERIC_TYPES = frozenset({*_INT_BITS, "decimal", "double", "float"})


def text(value: Any) -> str:
    """A driver value as text (information_schema and our own columns come back as
    bytes or str depending on the server)."""
    if value is None:
        return ""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    data_type: str  # "varchar", "bigint", ...
    column_type: str  # "bigint(20) unsigned", ...
    char_max: int | None
    octet_max: int | None
    collation: str | None
    auto_increment: bool

    @staticmethod
    def from_row(row: tuple[Any, ...]) -> Column:
        """A row of ``column_name, data_type, column_type, character_maximum_length,
        character_octet_length, collation_name, extra``."""
        name, dtype, ctype, cmax, omax, coll, extra = row
        return Column(
            text(name), text(dtype).lower(), text(ctype).lower(),
            int(cmax) if cmax is not None else None,
            int(omax) if omax is not None else None,
            text(coll) if coll is not None else None,
            "auto_increment" in text(extra).lower(),
        )

    def fits(self, value: str | bytes) -> bool:
        if isinstance(value, bytes):
            return self.octet_max is None or len(value) <= self.octet_max
        if self.data_type in ("varchar", "char") and self.char_max is not None:
            return len(value) <= self.char_max  # characters (code points), as MySQL counts them
        if self.octet_max is not None:
            return len(value.encode("utf-8")) <= self.octet_max
        return True

    def truncate(self, value: str) -> str:
        if self.data_type in ("varchar", "char") and self.char_max is not None:
            return value[: self.char_max]
        if self.octet_max is not None:
            return value.encode("utf-8")[: self.octet_max].decode("utf-8", "ignore")
        return value

    def int_range(self) -> tuple[int, int] | None:
        """The integers an integer column holds (None for any other type)."""
        bits = _INT_BITS.get(self.data_type)
        if bits is None:
            return None
        if "unsigned" in self.column_type:
            return 0, (1 << bits) - 1
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1

    @property
    def case_insensitive(self) -> bool:
        coll = (self.collation or "binary").lower()
        return not (coll == "binary" or coll.endswith("_bin") or coll.endswith("_cs"))
