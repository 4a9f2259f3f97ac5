"""Reading one field of the config file: each reader takes (tree, key, default,
where) and returns a typed value or raises ``ConfigError``, one line naming the
field (``where`` is the dotted path of its block, e.g. ``"exhook.http."``)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pyhocon import ConfigTree  # type: ignore[import-untyped]
from pyhocon.exceptions import ConfigException  # type: ignore[import-untyped]

from exhook.topics import QUEUE_PREFIX, SHARE_PREFIX, TopicError, validate_filter
from exhook.units import format_duration, parse_duration_ms, parse_duration_s, parse_size_bytes
from storage.config import HostPort, SslOptions
from storage.tls import TlsSetupError, client_context


class ConfigError(ValueError):
    """An invalid configuration; ``str()`` is one line naming the field."""


_MISSING = object()

# fields whose value is a secret: check-config masks them, no error message shows them
SECRET_FIELDS = frozenset({"password", "api_secret"})
# nor does an error show the API key: it is half of the credential
_NOT_ECHOED = SECRET_FIELDS | {"api_key"}


def get_value(tree: ConfigTree, key: str, default: Any) -> Any:
    try:
        value = tree.get(key, _MISSING)
    except ConfigException as exc:
        raise ConfigError(f"{key}: {exc}") from None
    return default if value is _MISSING or value is None else value


def read_bool(tree: ConfigTree, key: str, default: bool, where: str) -> bool:
    value = get_value(tree, key, default)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "on", "off"):
        return value.lower() in ("true", "on")
    raise ConfigError(f"{where}{key}: expected true or false, got {value!r}")


def read_int(
    tree: ConfigTree, key: str, default: int, where: str, minimum: int = 0, maximum: int | None = None
) -> int:
    value = get_value(tree, key, default)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ConfigError(f"{where}{key}: expected an integer, got {value!r}")
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(f"{where}{key}: expected an integer, got {value!r}") from None
    if maximum is not None and not minimum <= number <= maximum:
        raise ConfigError(f"{where}{key}: must be between {minimum} and {maximum}, got {number}")
    if number < minimum:
        raise ConfigError(f"{where}{key}: must be at least {minimum}, got {number}")
    return number


def read_parsed(tree: ConfigTree, key: str, default: int, where: str, parse: Callable[[Any], int],
            minimum: int = 0, show: Callable[[int], str] = str, maximum: int | None = None) -> int:
    """A value read by one of exhook.units' parsers, with its field named in any error."""
    try:
        number = parse(get_value(tree, key, default))
    except ValueError as exc:
        raise ConfigError(f"{where}{key}: {exc}") from None
    if number < minimum:
        raise ConfigError(f"{where}{key}: must be at least {show(minimum)}, got {show(number)}")
    if maximum is not None and number > maximum:
        raise ConfigError(f"{where}{key}: must be at most {show(maximum)}, got {show(number)}")
    return number


def read_duration_ms(tree: ConfigTree, key: str, default: int, where: str, minimum: int = 0,
                     maximum: int | None = None) -> int:
    """A duration in milliseconds; a bare integer is milliseconds (as the plugin's
    ``batch_time``). Every form EMQX accepts: ``"500ms"``, ``1.5s``, ``1m30s``, ``2h``."""
    return read_parsed(tree, key, default, where, parse_duration_ms, minimum, format_duration, maximum)


# Longer would overflow what the stores take (Redis EXPIRE, SQLite's 64-bit ms arithmetic)
MAX_DURATION_S = 100 * 365 * 86400


def read_duration_s(tree: ConfigTree, key: str, default: int, where: str) -> int:
    """A duration in whole seconds, at most 100 years; a bare integer is seconds (the
    plugin's ``message_ttl``)."""
    return read_parsed(tree, key, default, where, parse_duration_s, maximum=MAX_DURATION_S,
                       show=lambda n: f"{n} s")


def read_str(tree: ConfigTree, key: str, default: str, where: str) -> str:
    value = get_value(tree, key, default)
    if isinstance(value, (dict, list, ConfigTree)):
        raise ConfigError(f"{where}{key}: expected a string")
    if isinstance(value, (bool, int, float)):
        # HOCON has already turned the text into a number or a boolean, and back it
        # could differ (00123 -> 123, 1e5 -> 100000.0, true -> True): a password that
        # silently changed would only show up as a failed login
        shown = "the value" if key in _NOT_ECHOED else repr(value)  # errors are printed, secrets never
        raise ConfigError(f"{where}{key}: unquoted {shown} is read as a number or boolean; "
                          "write it in double quotes")
    if "\x00" in value:
        raise ConfigError(f"{where}{key}: contains a NUL character")
    return str(value)


def parse_host_port(text: str, default_port: int | None, field_name: str) -> HostPort:
    """``host:port``, ``[v6]:port`` or, with a ``default_port``, ``host`` alone."""
    raw = text.strip()
    if raw.startswith("["):
        host, sep, rest = raw[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
        if not sep or (rest and not rest.startswith(":")):
            raise ConfigError(f"{field_name}: bad host:port {text!r}")
    elif raw.count(":") == 1:
        host, port_text = raw.split(":")
        if not port_text:
            raise ConfigError(f"{field_name}: bad host:port {text!r} (missing port)")
    elif ":" in raw:
        raise ConfigError(f"{field_name}: bad host:port {text!r} (write IPv6 as [addr]:port)")
    else:
        host, port_text = raw, ""
    if not host or any(c.isspace() for c in host):
        raise ConfigError(f"{field_name}: bad host:port {text!r} (empty or invalid host)")
    if port_text == "":
        if default_port is None:
            raise ConfigError(f"{field_name}: expected host:port such as 0.0.0.0:9000, got {text!r} (no port)")
        return HostPort(host, default_port)
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"{field_name}: bad host:port {text!r} (port must be 1-65535)")
    return HostPort(host, int(port_text))


def read_host_ports(text: str, default_port: int, field_name: str) -> tuple[HostPort, ...]:
    items = [part for part in text.split(",") if part.strip()]
    if not items:
        raise ConfigError(f"{field_name}: at least one host:port is required")
    return tuple(parse_host_port(item, default_port, field_name) for item in items)


def read_topics(tree: ConfigTree, where: str) -> tuple[str, ...]:
    value = get_value(tree, "topics", [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise ConfigError(f"{where}topics: expected a list of topic filters")
    out = []
    for item in value:
        if not isinstance(item, str):
            raise ConfigError(f"{where}topics: expected a list of topic filters, got {item!r}")
        if not item:
            raise ConfigError(f'{where}topics: "" is not a topic filter (an empty list, not an empty filter, '
                              "makes the backend inactive)")
        if item.startswith((SHARE_PREFIX, QUEUE_PREFIX)):
            # messages are published to the real topic; a shared filter never matches one
            raise ConfigError(f"{where}topics: {item!r} is a shared subscription, not a topic filter: "
                              "list the topic filter itself (what follows $share/<group>/)")
        try:
            out.append(validate_filter(item))
        except TopicError as exc:
            raise ConfigError(f"{where}topics: {exc}") from None
    return tuple(dict.fromkeys(out))


def read_subtree(tree: ConfigTree, key: str, where: str) -> ConfigTree:
    value = get_value(tree, key, ConfigTree())
    if not isinstance(value, ConfigTree):
        raise ConfigError(f"{where}{key}: expected an object {{ ... }}")
    return value


def read_path(tree: ConfigTree, key: str, default: str, where: str, base: Path) -> str:
    """A file path; relative to ``base`` (the config file's directory), made absolute."""
    text = read_str(tree, key, default, where)
    return os.path.normpath(base / text) if text else ""


def read_ssl(tree: ConfigTree, where: str, base: Path) -> SslOptions:
    sub = read_subtree(tree, "ssl", where)
    at = f"{where}ssl."
    verify_raw = get_value(sub, "verify", True)
    if verify_raw in ("verify_peer", "verify_none"):
        verify = verify_raw == "verify_peer"
    else:
        verify = read_bool(sub, "verify", True, at)
    opts = SslOptions(
        enable=read_bool(sub, "enable", False, at),
        verify=verify,
        cacertfile=read_path(sub, "cacertfile", "", at, base),
        certfile=read_path(sub, "certfile", "", at, base),
        keyfile=read_path(sub, "keyfile", "", at, base),
        server_name_indication=read_str(sub, "server_name_indication", "", at),
    )
    if opts.enable:
        for name in ("cacertfile", "certfile", "keyfile"):
            path = getattr(opts, name)
            if path and not Path(path).is_file():
                raise ConfigError(f"{at}{name}: file not found: {path}")
        if bool(opts.certfile) != bool(opts.keyfile):
            raise ConfigError(f"{at}certfile: certfile and keyfile must be given together")
        try:  # the files load now (a file that is not PEM is a config error, not a traceback later)
            client_context(opts, at[:-1])
        except TlsSetupError as exc:
            raise ConfigError(str(exc)) from None
    return opts



def read_size_bytes(tree: ConfigTree, key: str, default: int, where: str, minimum: int = 0) -> int:
    """A size in bytes: an integer or ``"64MB"`` (= 64 MiB, as EMQX counts), ``"1GiB"``."""
    return read_parsed(tree, key, default, where, parse_size_bytes, minimum, lambda n: f"{n} bytes")


def check_file_path(path: str, field_name: str) -> None:
    """A database file the service creates if missing: it must not be a directory,
    and no existing part of its directory may be a file."""
    target = Path(path)
    if target.is_dir():
        raise ConfigError(f"{field_name}: {path} is a directory, not a database file")
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{field_name}: cannot create {path}: {parent} is not a directory")
            return
