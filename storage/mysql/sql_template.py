"""The Erlang plugin's SQL templates: ``${var}`` placeholders -> bound parameters.

A template such as ``delete from mqtt_msg where msgid = ${id}`` compiles to the
PyMySQL/aiomysql statement ``delete from mqtt_msg where msgid = %s`` plus the ordered
placeholder names ``("id",)``. Values are always sent as parameters (escaped by the
driver), never spliced into the SQL text, so a topic such as ``x'; drop table t; --``
is stored verbatim and harms nothing.

Rules, following ``emqx_template_sql:parse_prepstmt(..., #{strip_double_quote => true})``
as the plugin 2.0.0 calls it:

* ``${name}`` and ``"${name}"`` (the double quotes are stripped) are placeholders;
  a name outside ``SQL_PLACEHOLDERS`` is an error naming it.
* a placeholder inside a quoted literal (``'${clientid}'``, or in backticks) is an
  error: the driver quotes the value itself, so the quotes around it would end the
  literal and put the value outside any string (SQL injection). The plugin's
  prepared statement would take it as the literal text ``?``.
* every other character is literal SQL; a literal ``%`` is doubled so that the
  driver's ``%``-formatting leaves it intact (``like 'a%'`` stays ``like 'a%'``).
  Execute a compiled template always with an args tuple (possibly empty): PyMySQL
  only runs the ``%`` substitution when args are given.
* trailing ``;`` and white space are dropped (the statement may be wrapped in a
  derived table).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from storage.config import SQL_PLACEHOLDERS
from storage.model import StoredMessage

# ``"${x}"`` first so that the quotes are consumed with the placeholder.
_PLACEHOLDER = re.compile(r'"\$\{([^}]*)\}"|\$\{([^}]*)\}')


class SqlTemplateError(ValueError):
    """A template that cannot be used; ``str()`` is one line naming the template
    and the cause."""


@dataclass(frozen=True, slots=True)
class SqlTemplate:
    """A compiled template."""

    name: str  # the config field, e.g. "insert_message_sql" (used in messages)
    source: str  # the template as configured (trailing ';' removed)
    sql: str  # driver SQL: one %s per placeholder, literal % doubled
    params: tuple[str, ...]  # placeholder names, in order (repeats allowed)
    prepare_sql: str  # server-side PREPARE text: one ? per placeholder

    def args(self, values: Mapping[str, object]) -> tuple[object, ...]:
        """The parameter tuple for ``values`` (placeholder name -> value)."""
        try:
            return tuple(values[name] for name in self.params)
        except KeyError as exc:
            raise SqlTemplateError(
                f"{self.name}: placeholder ${{{exc.args[0]}}} has no value in this statement"
            ) from None

    def require_only(self, available: Iterable[str]) -> None:
        """Raise if the template uses a placeholder not in ``available``."""
        allowed = set(available)
        for name in self.params:
            if name not in allowed:
                raise SqlTemplateError(
                    f"{self.name}: placeholder ${{{name}}} is not available in this statement "
                    f"(available: {', '.join('${' + a + '}' for a in sorted(allowed))})"
                )


def compile_template(
    name: str, source: str, allowed: Iterable[str] = SQL_PLACEHOLDERS
) -> SqlTemplate:
    """Compile ``source``; raise ``SqlTemplateError`` naming an unknown placeholder."""
    allowed_set = frozenset(allowed)
    text = source.strip()
    while text.endswith(";"):
        text = text[:-1].rstrip()
    if not text:
        raise SqlTemplateError(f"{name}: empty SQL template")
    sql: list[str] = []
    prepare: list[str] = []
    params: list[str] = []
    pos = 0
    for start, end, var in _placeholders(name, text):
        literal = text[pos:start]
        sql.append(literal.replace("%", "%%"))
        prepare.append(literal)
        if var not in allowed_set:
            raise SqlTemplateError(f"{name}: unknown placeholder ${{{var}}}")
        params.append(var)
        sql.append("%s")
        prepare.append("?")
        pos = end
    sql.append(text[pos:].replace("%", "%%"))
    prepare.append(text[pos:])
    return SqlTemplate(name, text, "".join(sql), tuple(params), "".join(prepare))


def _comment_end(text: str, i: int) -> int | None:
    """Where the comment starting at ``i`` ends (``/* */``, ``-- `` or ``#`` to the end
    of the line, as MySQL reads them), or None if none starts there."""
    if text.startswith("/*", i):
        end = text.find("*/", i + 2)
        return len(text) if end < 0 else end + 2
    if text[i] == "#" or (text.startswith("--", i) and (i + 2 == len(text) or text[i + 2] in " \t\r\n")):
        end = text.find("\n", i)
        return len(text) if end < 0 else end + 1
    return None


def _placeholders(name: str, text: str) -> Iterator[tuple[int, int, str]]:
    """``(start, end, name)`` of every placeholder of ``text``, in order; raise
    ``SqlTemplateError`` for one inside a quoted literal or a comment (module
    docstring). Comments are skipped: a quote in one must not be taken for a literal."""
    quote: str | None = None
    i = 0
    while i < len(text):
        ch = text[i]
        if quote is None and (match := _PLACEHOLDER.match(text, i)):
            yield match.start(), match.end(), match.group(1) if match.group(1) is not None else match.group(2)
            i = match.end()
            continue
        if quote is None and (end := _comment_end(text, i)) is not None:
            if "${" in text[i:end]:
                raise SqlTemplateError(f"{name}: a placeholder inside a comment")
            i = end
            continue
        if quote is None:
            if ch in "'\"`":
                quote = ch
        elif ch == "\\" and quote != "`":
            i += 1  # the escaped character is part of the literal
        elif ch == quote:
            if text.startswith(quote * 2, i):
                i += 1  # a doubled quote stays inside the literal
            else:
                quote = None
        elif text.startswith("${", i):
            end = text.find("}", i)
            var = text[i + 2 : end] if end > 0 else text[i + 2 :]
            raise SqlTemplateError(
                f"{name}: placeholder ${{{var}}} inside a quoted literal ({quote}...{quote}): write it "
                "without quotes, its value is sent as a parameter"
            )
        i += 1


# ---------------------------------------------------------------------------
# values
# ---------------------------------------------------------------------------


def message_values(message: StoredMessage) -> dict[str, object]:
    """Placeholder values of a message, as the plugin renders them: ``id`` the
    32-hex-digit id, ``from``/``clientid`` the sender, ``retain`` 0/1,
    ``timestamp`` milliseconds, ``payload`` raw bytes."""
    retain = 1 if message.retain else 0
    return {
        "id": message.msgid,
        "from": message.sender,
        "clientid": message.sender,
        "topic": message.topic,
        "qos": int(message.qos),
        "flags.retain": retain,
        "retain": retain,
        "payload": bytes(message.payload),
        "timestamp": int(message.timestamp),
    }


def subscription_values(clientid: str, topic: str = "", qos: int = 0) -> dict[str, object]:
    return {"clientid": clientid, "topic": topic, "qos": int(qos)}


# ---------------------------------------------------------------------------
# plain ``insert into t(cols) values(...)``: multi-row batching, column mapping
# ---------------------------------------------------------------------------

_IDENT = r"(?:`(?:[^`]|``)+`|[A-Za-z0-9_$]+)"
_PLAIN_INSERT = re.compile(
    rf"^\s*insert\s+(?:ignore\s+)?into\s+(?P<table>{_IDENT}(?:\s*\.\s*{_IDENT})?)\s*"
    r"\((?P<cols>[^()]*)\)\s*values?\s*(?P<row>\(.*)$",
    re.IGNORECASE | re.DOTALL,
)


def unquote_ident(ident: str) -> str:
    ident = ident.strip()
    if len(ident) >= 2 and ident[0] == "`" and ident[-1] == "`":
        return ident[1:-1].replace("``", "`")
    return ident


def quote_ident(ident: str) -> str:
    return "`" + ident.replace("`", "``") + "`"


def _split_table(table: str) -> tuple[str | None, str]:
    parts = re.findall(_IDENT, table)
    if len(parts) == 2:
        return unquote_ident(parts[0]), unquote_ident(parts[1])
    return None, unquote_ident(parts[0])


def _unquoted(text: str) -> Iterator[tuple[int, str, int]]:
    """Yield ``(index, char, depth)`` for every character outside quotes (``'``,
    ``"``, backticks; doubled quotes and backslash escapes honoured), with the
    parenthesis depth after it. Ends with ``(len(text), "", depth)``, or with
    ``(i, "", -1)`` at an unbalanced ``)`` or an unterminated quote."""
    depth = 0
    quote: str | None = None
    i = 0
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == "\\" and quote != "`":
                i += 2
                continue
            if ch == quote:
                if i + 1 < len(text) and text[i + 1] == quote:  # doubled quote
                    i += 2
                    continue
                quote = None
        elif ch in "'\"`":
            quote = ch
        else:
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if depth < 0:
                yield i, "", -1
                return
            yield i, ch, depth
        i += 1
    yield len(text), "", -1 if quote else depth


def _split_top_level(text: str) -> list[str] | None:
    """Split at commas outside parentheses and quotes; None if unbalanced."""
    parts: list[str] = []
    start = 0
    for i, ch, depth in _unquoted(text):
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
        elif ch == "":
            if depth != 0:
                return None
            parts.append(text[start:])
    return parts


@dataclass(frozen=True, slots=True)
class PlainInsert:
    """``insert into <table>(<columns>) values(<row>) [<tail>]``; usable for multi-row
    batching only when ``tail`` is empty (see ``parse_plain_insert``)."""

    schema: str | None
    table: str
    columns: tuple[str, ...]
    head: SqlTemplate  # "insert into t(c1, c2) values" (no placeholders)
    row: SqlTemplate  # "(%s, %s, FROM_UNIXTIME(%s/1000))"
    direct: dict[str, str]  # placeholder -> column, where the value is exactly ${placeholder}
    time_column: str | None  # the column whose value uses ${timestamp}
    tail: str = ""  # e.g. "on duplicate key update qos = ${qos}"

    def multi_row(self, count: int) -> str:
        return self.head.sql + " " + ", ".join([self.row.sql] * count)


def parse_plain_insert(template: SqlTemplate) -> PlainInsert | None:
    """Recognise a plain single-row INSERT (the plugin's default shape), else None."""
    shape = parse_insert(template)
    return shape if shape is not None and not shape.tail else None


def parse_insert(template: SqlTemplate) -> PlainInsert | None:
    """``insert [ignore] into t(cols) values(row) [tail]``: the table and which column
    each placeholder fills (also with a tail such as ``on duplicate key update``)."""
    match = _PLAIN_INSERT.match(template.source)
    if not match:
        return None
    rest = match.group("row")
    end = _closing_paren(rest)
    if end < 0:
        return None
    row_text, tail = rest[: end + 1], rest[end + 1 :].strip()
    values = _split_top_level(row_text[1:-1])
    if values is None:
        return None
    columns = tuple(unquote_ident(c) for c in match.group("cols").split(","))
    if len(columns) != len(values) or any(not c for c in columns):
        return None
    head_text = template.source[: match.start("row")].rstrip()
    if _PLACEHOLDER.search(head_text):
        return None
    schema, table = _split_table(match.group("table"))
    direct: dict[str, str] = {}
    time_column = None
    for column, value in zip(columns, values, strict=True):
        found = _PLACEHOLDER.fullmatch(value.strip())
        if found:
            var = found.group(1) if found.group(1) is not None else found.group(2)
            direct.setdefault(var, column)
        if "${timestamp}" in value and time_column is None:
            time_column = column
    head = compile_template(template.name, head_text, ())
    row = compile_template(template.name, row_text)
    return PlainInsert(schema, table, columns, head, row, direct, time_column, tail)


def _closing_paren(text: str) -> int:
    """Index of the parenthesis closing ``text[0]`` (quote-aware), or -1."""
    for i, ch, depth in _unquoted(text):
        if ch == ")" and depth == 0:
            return i
    return -1


_TABLE_AFTER = re.compile(rf"\b(?:into|from|update)\s+(?P<table>{_IDENT}(?:\s*\.\s*{_IDENT})?)", re.I)


def first_table(template: SqlTemplate) -> tuple[str | None, str] | None:
    """The first table named after INTO / FROM / UPDATE (for error messages and
    schema checks of templates that are not plain inserts)."""
    match = _TABLE_AFTER.search(template.source)
    if not match:
        return None
    return _split_table(match.group("table"))


_DELETE_BY_ID = re.compile(
    rf"^\s*delete\s+from\s+(?P<table>{_IDENT}(?:\s*\.\s*{_IDENT})?)\s+where\s+(?P<col>{_IDENT})"
    r'\s*=\s*(?:\$\{id\}|"\$\{id\}")\s*$',
    re.IGNORECASE,
)


def parse_delete_by_id(template: SqlTemplate) -> tuple[str, str] | None:
    """For ``delete from <table> where <column> = ${id}`` (the plugin's default
    delete_message_sql): the quoted table and column, so that many deletes can be one
    ``DELETE ... WHERE <column> IN (...)``. None for any other shape."""
    match = _DELETE_BY_ID.match(template.source)
    if not match:
        return None
    schema, table = _split_table(match.group("table"))
    table_sql = quote_ident(table) if schema is None else f"{quote_ident(schema)}.{quote_ident(table)}"
    return table_sql, quote_ident(unquote_ident(match.group("col")))
