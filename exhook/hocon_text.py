"""Reading HOCON text with pyhocon, minus one of its quirks.

pyhocon drops an empty string inside a list: ``topics = [""]`` parses as ``[]`` (its
list parser takes ``""`` for the empty token a trailing comma leaves). For this
service that turns a typo into a silently inactive backend. So before parsing, every
``""`` that stands alone as a list element is swapped for a marker, and after parsing
the marker is turned back into ``""``: the field's own validation then reports it.

Files pulled in with ``include`` are read by pyhocon itself and keep the quirk.
"""

from __future__ import annotations

from typing import Any

from pyhocon import ConfigFactory, ConfigTree  # type: ignore[import-untyped]

_MARKER = "__offline_exhook_empty_list_element__"


def parse_hocon(text: str, basedir: str | None = None) -> ConfigTree:
    """Parse and resolve ``text`` (``include`` paths relative to ``basedir``)."""
    tree = ConfigFactory.parse_string(mark_empty_list_elements(text), basedir=basedir, resolve=True)
    _unmark(tree)
    return tree


def mark_empty_list_elements(text: str) -> str:
    """``text`` with each list element written ``""`` replaced by the marker."""
    out: list[str] = []
    brackets: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if text.startswith('"""', i):  # a multi-line string: copied as it is
            end = text.find('"""', i + 3)
            end = n if end == -1 else end + 3
            out.append(text[i:end])
            i = end
        elif ch == '"':
            end = _string_end(text, i)
            if end == i + 2 and brackets[-1:] == ["["] and _alone(text, i, end):
                out.append(f'"{_MARKER}"')
            else:
                out.append(text[i:end])
            i = end
        elif ch == "#" or text.startswith("//", i):  # a comment: up to the end of the line
            end = text.find("\n", i)
            end = n if end == -1 else end
            out.append(text[i:end])
            i = end
        else:
            if ch in "[{":
                brackets.append(ch)
            elif ch in "]}" and brackets:
                brackets.pop()
            out.append(ch)
            i += 1
    return "".join(out)


def _string_end(text: str, start: int) -> int:
    """Index just past the double-quoted string opening at ``start``."""
    i = start + 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == '"':
            return i + 1
        if text[i] == "\n":  # unterminated: let pyhocon report it
            return i
        i += 1
    return i


def _alone(text: str, start: int, end: int) -> bool:
    """True if the string at ``start:end`` is a whole list element (not part of a
    concatenation such as ``"" abc``)."""
    before = text[:start].rstrip(" \t")
    after = text[end:].lstrip(" \t")
    return before[-1:] in ("[", ",", "\n") and after[:1] in ("]", ",", "\n", "#", "/", "")


def _unmark(tree: Any) -> None:
    # dict's own methods: ConfigTree.items() and [] hand out copies of the lists
    items = dict.items(tree) if isinstance(tree, ConfigTree) else enumerate(tree)
    for key, value in list(items):
        if isinstance(value, str) and value == _MARKER:
            if isinstance(tree, ConfigTree):
                dict.__setitem__(tree, key, "")
            else:
                tree[key] = ""
        elif isinstance(value, (ConfigTree, list)):
            _unmark(value)
