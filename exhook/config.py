"""Configuration: parsed once from HOCON into typed, validated objects.

Field names follow the Erlang plugin ``emqx_offline_message_plugin`` 2.0.0 for the
``mysql`` and ``redis`` blocks; ``sqlite`` and ``exhook`` are this service's own.
Every error is a ``ConfigError`` whose text is one line naming the field.
Relative paths (``sqlite.path``, ``exhook.spool.path``, every ``ssl`` file) are
relative to the config file's directory, whatever the working directory, and are
absolute once parsed. Durations and sizes go through ``exhook.units``.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from pyhocon import ConfigTree  # type: ignore[import-untyped]
from pyhocon.exceptions import ConfigException  # type: ignore[import-untyped]

from exhook.hocon_text import parse_hocon
from exhook.topics import QUEUE_PREFIX, SHARE_PREFIX, TopicError, validate_filter
from exhook.units import format_duration, parse_duration_ms, parse_duration_s, parse_size_bytes
from storage.config import DEFAULT_SQL as DEFAULT_SQL
from storage.config import SQL_PLACEHOLDERS as SQL_PLACEHOLDERS
from storage.config import SQL_TEMPLATE_FIELDS as SQL_TEMPLATE_FIELDS
from storage.config import BackendCommon as BackendCommon
from storage.config import BackendConfig as BackendConfig
from storage.config import HostPort as HostPort
from storage.config import MysqlConfig as MysqlConfig
from storage.config import RedisConfig as RedisConfig
from storage.config import SqliteConfig as SqliteConfig
from storage.config import SslOptions as SslOptions
from storage.errors import first_line


class ConfigError(ValueError):
    """An invalid configuration; ``str()`` is one line naming the field."""


@dataclass(frozen=True, slots=True)
class EmqxApiConfig:
    url: str = "http://127.0.0.1:18083"
    api_key: str = field(default="", repr=False)
    api_secret: str = field(default="", repr=False)
    request_timeout_ms: int = 5000
    ssl: SslOptions = SslOptions()


@dataclass(frozen=True, slots=True)
class ServerTlsConfig:
    """TLS on the gRPC listener EMQX connects to. ``verify = verify_peer`` makes it
    mutual: a client must present a certificate signed by ``cacertfile``."""

    enable: bool = False
    certfile: str = ""
    keyfile: str = ""
    cacertfile: str = ""
    verify_peer: bool = False


@dataclass(frozen=True, slots=True)
class HttpConfig:
    """The small HTTP port: ``/healthz``, ``/readyz``, ``/metrics``."""

    enable: bool = True
    listen: HostPort = HostPort("0.0.0.0", 9001)
    check_interval_ms: int = 5000


@dataclass(frozen=True, slots=True)
class SpoolConfig:
    """The local spool: messages answered while the store could not take them in
    time wait here (fsync'd) until the store is back. Beyond ``max_bytes`` new
    messages are refused (not stored), loudly."""

    path: str = "data/spool.sqlite3"
    max_bytes: int = 1 << 30


_SPOOL_DEFAULT = SpoolConfig()


LogFormat = Literal["text", "json"]


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    listen: HostPort = HostPort("0.0.0.0", 9000)
    workers: int = 1
    publish_deadline_ms: int = 500
    replay_batch_size: int = 100
    log_level: str = "info"
    log_format: LogFormat = "text"
    max_pending_writes: int = 10000
    emqx: EmqxApiConfig = EmqxApiConfig()
    ssl: ServerTlsConfig = ServerTlsConfig()
    http: HttpConfig = HttpConfig()
    spool: SpoolConfig = SpoolConfig()
    # CIDR blocks whose peers may call the gRPC port (empty: any)
    allowed_clients: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Config:
    service: ServiceConfig
    backend: BackendConfig


# ---------------------------------------------------------------------------
# parsing helpers: each takes (tree, dotted path) and raises ConfigError
# ---------------------------------------------------------------------------

T = TypeVar("T")
_MISSING = object()


def _get(tree: ConfigTree, key: str, default: Any) -> Any:
    try:
        value = tree.get(key, _MISSING)
    except ConfigException as exc:
        raise ConfigError(f"{key}: {exc}") from None
    return default if value is _MISSING or value is None else value


def _bool(tree: ConfigTree, key: str, default: bool, where: str) -> bool:
    value = _get(tree, key, default)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "on", "off"):
        return value.lower() in ("true", "on")
    raise ConfigError(f"{where}{key}: expected true or false, got {value!r}")


def _int(
    tree: ConfigTree, key: str, default: int, where: str, minimum: int = 0, maximum: int | None = None
) -> int:
    value = _get(tree, key, default)
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


def _parsed(tree: ConfigTree, key: str, default: int, where: str, parse: Callable[[Any], int],
            minimum: int = 0, show: Callable[[int], str] = str) -> int:
    """A value read by one of exhook.units' parsers, with its field named in any error."""
    try:
        number = parse(_get(tree, key, default))
    except ValueError as exc:
        raise ConfigError(f"{where}{key}: {exc}") from None
    if number < minimum:
        raise ConfigError(f"{where}{key}: must be at least {show(minimum)}, got {show(number)}")
    return number


def _duration_ms(tree: ConfigTree, key: str, default: int, where: str, minimum: int = 0) -> int:
    """A duration in milliseconds; a bare integer is milliseconds (as the plugin's
    ``batch_time``). Every form EMQX accepts: ``"500ms"``, ``1.5s``, ``1m30s``, ``2h``."""
    return _parsed(tree, key, default, where, parse_duration_ms, minimum, format_duration)


def _duration_s(tree: ConfigTree, key: str, default: int, where: str) -> int:
    """A duration in whole seconds; a bare integer is seconds (the plugin's ``message_ttl``)."""
    return _parsed(tree, key, default, where, parse_duration_s)


def _str(tree: ConfigTree, key: str, default: str, where: str) -> str:
    value = _get(tree, key, default)
    if isinstance(value, (dict, list, ConfigTree)):
        raise ConfigError(f"{where}{key}: expected a string")
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


def _host_ports(text: str, default_port: int, field_name: str) -> tuple[HostPort, ...]:
    items = [part for part in text.split(",") if part.strip()]
    if not items:
        raise ConfigError(f"{field_name}: at least one host:port is required")
    return tuple(parse_host_port(item, default_port, field_name) for item in items)


def _topics(tree: ConfigTree, where: str) -> tuple[str, ...]:
    value = _get(tree, "topics", [])
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


def _subtree(tree: ConfigTree, key: str, where: str) -> ConfigTree:
    value = _get(tree, key, ConfigTree())
    if not isinstance(value, ConfigTree):
        raise ConfigError(f"{where}{key}: expected an object {{ ... }}")
    return value


def _path(tree: ConfigTree, key: str, default: str, where: str, base: Path) -> str:
    """A file path; relative to ``base`` (the config file's directory), made absolute."""
    text = _str(tree, key, default, where)
    return os.path.normpath(base / text) if text else ""


def _ssl(tree: ConfigTree, where: str, base: Path) -> SslOptions:
    sub = _subtree(tree, "ssl", where)
    at = f"{where}ssl."
    verify_raw = _get(sub, "verify", True)
    if verify_raw in ("verify_peer", "verify_none"):
        verify = verify_raw == "verify_peer"
    else:
        verify = _bool(sub, "verify", True, at)
    opts = SslOptions(
        enable=_bool(sub, "enable", False, at),
        verify=verify,
        cacertfile=_path(sub, "cacertfile", "", at, base),
        certfile=_path(sub, "certfile", "", at, base),
        keyfile=_path(sub, "keyfile", "", at, base),
        server_name_indication=_str(sub, "server_name_indication", "", at),
    )
    if opts.enable:
        for name in ("cacertfile", "certfile", "keyfile"):
            path = getattr(opts, name)
            if path and not Path(path).is_file():
                raise ConfigError(f"{at}{name}: file not found: {path}")
        if bool(opts.certfile) != bool(opts.keyfile):
            raise ConfigError(f"{at}certfile: certfile and keyfile must be given together")
    return opts


_COMMON_FIELDS = {"enable", "topics", "batch_size", "batch_time", "message_ttl"}
_SSL_FIELDS = {"enable", "verify", "cacertfile", "certfile", "keyfile", "server_name_indication"}
_KNOWN_FIELDS: dict[str, set[str]] = {
    "": {"exhook", "redis", "mysql", "sqlite"},
    "exhook.": {"listen", "workers", "publish_deadline", "replay_batch_size", "log_level", "log_format",
                "max_pending_writes", "emqx", "ssl", "http", "spool", "allowed_clients"},
    "exhook.spool.": {"path", "max_bytes"},
    "exhook.ssl.": {"enable", "certfile", "keyfile", "cacertfile", "verify"},
    "exhook.http.": {"enable", "listen", "check_interval"},
    "exhook.emqx.": {"api_url", "api_key", "api_secret", "request_timeout", "ssl"},
    "redis.": _COMMON_FIELDS | {"servers", "redis_type", "sentinel", "pool_size", "username", "password",
                                "database", "message_key_prefix", "subscription_key_prefix", "ssl",
                                "wait_replicas", "wait_timeout"},
    "mysql.": _COMMON_FIELDS | {"server", "pool_size", "username", "password", "database",
                                "init_default_schema", "ssl", *SQL_TEMPLATE_FIELDS},
    "sqlite.": _COMMON_FIELDS | {"path"},
}


def _reject_unknown(tree: ConfigTree, where: str) -> None:
    """A misspelt field would otherwise be silently ignored."""
    for key, value in tree.items():
        known = _KNOWN_FIELDS.get(where, set())
        if key not in known:
            raise ConfigError(f"{where}{key}: unknown field (expected one of {', '.join(sorted(known))})")
        if isinstance(value, ConfigTree):
            sub = f"{where}{key}."
            if key == "ssl" and sub not in _KNOWN_FIELDS:
                for ssl_key in value:
                    if ssl_key not in _SSL_FIELDS:
                        raise ConfigError(f"{sub}{ssl_key}: unknown field")
            elif sub in _KNOWN_FIELDS:
                _reject_unknown(value, sub)


def _common(tree: ConfigTree, where: str, ttl_default: int) -> dict[str, Any]:
    return {
        "topics": _topics(tree, where),
        "batch_size": _int(tree, "batch_size", 1, where, minimum=1, maximum=10000),
        "batch_time_ms": _duration_ms(tree, "batch_time", 100, where),
        "message_ttl": _duration_s(tree, "message_ttl", ttl_default, where),
    }


def _parse_redis(tree: ConfigTree, base: Path) -> RedisConfig:
    where = "redis."
    redis_type = _str(tree, "redis_type", "single", where)
    if redis_type not in ("single", "sentinel", "cluster"):
        raise ConfigError(
            f"redis.redis_type: unknown value {redis_type!r} (expected single, sentinel or cluster)"
        )
    default_port = 26379 if redis_type == "sentinel" else 6379
    servers = _host_ports(_str(tree, "servers", "127.0.0.1:6379", where), default_port, "redis.servers")
    if redis_type == "single" and len(servers) != 1:
        raise ConfigError("redis.servers: redis_type single takes exactly one host:port")
    sentinel = _str(tree, "sentinel", "", where)
    if redis_type == "sentinel" and not sentinel:
        raise ConfigError("redis.sentinel: the master name is required when redis_type = sentinel")
    msg_prefix = _str(tree, "message_key_prefix", "mqtt:msg", where)
    sub_prefix = _str(tree, "subscription_key_prefix", "mqtt:sub", where)
    if not msg_prefix or not sub_prefix or msg_prefix == sub_prefix:
        raise ConfigError("redis.message_key_prefix: must be non-empty and differ from subscription_key_prefix")
    return RedisConfig(
        **_common(tree, where, ttl_default=7200),
        servers=servers,
        redis_type=redis_type,  # type: ignore[arg-type]
        sentinel=sentinel,
        pool_size=_int(tree, "pool_size", 8, where, minimum=1, maximum=1024),
        username=_str(tree, "username", "", where),
        password=_str(tree, "password", "", where),
        database=_int(tree, "database", 0, where),
        message_key_prefix=msg_prefix,
        subscription_key_prefix=sub_prefix,
        wait_replicas=_int(tree, "wait_replicas", 0, where, maximum=16),
        wait_timeout_ms=_duration_ms(tree, "wait_timeout", 1000, where, minimum=1),
        ssl=_ssl(tree, where, base),
    )


_PLACEHOLDER = re.compile(r"\$\{([^}]*)\}")

def check_sql_template(field_name: str, sql: str) -> None:
    if not sql.strip():
        raise ConfigError(f"{field_name}: empty SQL template")
    for name in _PLACEHOLDER.findall(sql):
        if name not in SQL_PLACEHOLDERS:
            raise ConfigError(f"{field_name}: unknown placeholder ${{{name}}}")


def _parse_mysql(tree: ConfigTree, base: Path) -> MysqlConfig:
    where = "mysql."
    sql = {}
    for name in SQL_TEMPLATE_FIELDS:
        sql[name] = _str(tree, name, DEFAULT_SQL[name], where)
        check_sql_template(where + name, sql[name])
    return MysqlConfig(
        **_common(tree, where, ttl_default=0),
        server=parse_host_port(_str(tree, "server", "127.0.0.1:3306", where), 3306, "mysql.server"),
        pool_size=_int(tree, "pool_size", 8, where, minimum=1, maximum=1024),
        username=_str(tree, "username", "root", where),
        password=_str(tree, "password", "", where),
        database=_str(tree, "database", "mqtt", where),
        init_default_schema=_bool(tree, "init_default_schema", False, where),
        sql=sql,
        ssl=_ssl(tree, where, base),
    )


def _parse_sqlite(tree: ConfigTree, base: Path) -> SqliteConfig:
    where = "sqlite."
    path = _path(tree, "path", "data/offline-messages.sqlite3", where, base)
    if not path:
        raise ConfigError("sqlite.path: must not be empty")
    _check_file_path(path, "sqlite.path")
    return SqliteConfig(**_common(tree, where, ttl_default=0), path=path)


def _check_file_path(path: str, field_name: str) -> None:
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


def _server_tls(tree: ConfigTree, base: Path) -> ServerTlsConfig:
    sub = _subtree(tree, "ssl", "exhook.")
    at = "exhook.ssl."
    verify = _get(sub, "verify", "verify_none")
    if verify not in ("verify_peer", "verify_none"):
        raise ConfigError(f"{at}verify: expected verify_peer or verify_none, got {verify!r}")
    opts = ServerTlsConfig(
        enable=_bool(sub, "enable", False, at),
        certfile=_path(sub, "certfile", "", at, base),
        keyfile=_path(sub, "keyfile", "", at, base),
        cacertfile=_path(sub, "cacertfile", "", at, base),
        verify_peer=verify == "verify_peer",
    )
    if not opts.enable:
        return opts
    for name in ("certfile", "keyfile"):
        if not getattr(opts, name):
            raise ConfigError(f"{at}{name}: required when exhook.ssl.enable = true")
    if opts.verify_peer and not opts.cacertfile:
        raise ConfigError(f"{at}cacertfile: required with verify = verify_peer (client certificates chain to it)")
    for name in ("certfile", "keyfile", "cacertfile"):
        path = getattr(opts, name)
        if path and not Path(path).is_file():
            raise ConfigError(f"{at}{name}: file not found: {path}")
    return opts


def _http(tree: ConfigTree, grpc_listen: HostPort) -> HttpConfig:
    sub = _subtree(tree, "http", "exhook.")
    at = "exhook.http."
    http = HttpConfig(
        enable=_bool(sub, "enable", True, at),
        listen=parse_host_port(_str(sub, "listen", "0.0.0.0:9001", at), None, f"{at}listen"),
        check_interval_ms=_duration_ms(sub, "check_interval", 5000, at, minimum=100),
    )
    if http.enable and _same_socket(http.listen, grpc_listen):
        raise ConfigError(f"{at}listen: {http.listen} takes the port of exhook.listen ({grpc_listen}): "
                          "give the HTTP port its own")
    return http


def usable_cpus() -> int:
    """CPUs this process may run on (a cpuset / taskset counts, a CFS quota does not)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


_ANY_HOST = ("0.0.0.0", "::", "")


def _same_socket(a: HostPort, b: HostPort) -> bool:
    """Would binding both clash? Same port, and the same host or a wildcard on either side."""
    return a.port == b.port and (a.host == b.host or a.host in _ANY_HOST or b.host in _ANY_HOST)


def _size_bytes(tree: ConfigTree, key: str, default: int, where: str, minimum: int = 0) -> int:
    """A size in bytes: an integer or ``"64MB"`` (= 64 MiB, as EMQX counts), ``"1GiB"``."""
    return _parsed(tree, key, default, where, parse_size_bytes, minimum, lambda n: f"{n} bytes")


def _spool(tree: ConfigTree, base: Path) -> SpoolConfig:
    sub = _subtree(tree, "spool", "exhook.")
    at = "exhook.spool."
    path = _path(sub, "path", _SPOOL_DEFAULT.path, at, base)
    if not path:
        raise ConfigError(f"{at}path: must not be empty")
    _check_file_path(path, f"{at}path")
    return SpoolConfig(path=path, max_bytes=_size_bytes(sub, "max_bytes", _SPOOL_DEFAULT.max_bytes, at,
                                                                minimum=1 << 20))


def _allowed_clients(tree: ConfigTree) -> tuple[str, ...]:
    value = _get(tree, "allowed_clients", [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise ConfigError("exhook.allowed_clients: expected a list of CIDR blocks such as [\"10.0.0.0/8\"]")
    blocks = []
    for item in value:
        try:
            blocks.append(str(ipaddress.ip_network(str(item).strip(), strict=False)))
        except ValueError:
            raise ConfigError(f"exhook.allowed_clients: {item!r} is not an address or CIDR block") from None
    return tuple(dict.fromkeys(blocks))


def _parse_service(tree: ConfigTree, base: Path) -> ServiceConfig:
    where = "exhook."
    api = _subtree(tree, "emqx", where)
    at = "exhook.emqx."
    url = _str(api, "api_url", "http://127.0.0.1:18083", at).rstrip("/")
    if not re.match(r"^https?://[^/\s]+", url):
        raise ConfigError(f"exhook.emqx.api_url: expected http://host:port or https://host:port, got {url!r}")
    level = _str(tree, "log_level", "info", where).lower()
    if level not in ("debug", "info", "warning", "error", "critical"):
        raise ConfigError(f"exhook.log_level: unknown level {level!r} (debug, info, warning, error)")
    workers = _int(tree, "workers", 0, where, maximum=256)
    log_format = _str(tree, "log_format", "text", where).lower()
    if log_format not in ("text", "json"):
        raise ConfigError(f"exhook.log_format: expected text or json, got {log_format!r}")
    listen = parse_host_port(_str(tree, "listen", "0.0.0.0:9000", where), None, "exhook.listen")
    return ServiceConfig(
        listen=listen,
        workers=workers or usable_cpus(),
        publish_deadline_ms=_duration_ms(tree, "publish_deadline", 500, where, minimum=1),
        replay_batch_size=_int(tree, "replay_batch_size", 100, where, minimum=1, maximum=10000),
        log_level=level,
        log_format=log_format,  # type: ignore[arg-type]
        max_pending_writes=_int(tree, "max_pending_writes", 10000, where, minimum=1),
        emqx=EmqxApiConfig(
            url=url,
            api_key=_str(api, "api_key", "", at),
            api_secret=_str(api, "api_secret", "", at),
            request_timeout_ms=_duration_ms(api, "request_timeout", 5000, at, minimum=1),
            ssl=_ssl(api, at, base),
        ),
        ssl=_server_tls(tree, base),
        http=_http(tree, listen),
        spool=_spool(tree, base),
        allowed_clients=_allowed_clients(tree),
    )


_BACKENDS: dict[str, Callable[[ConfigTree, Path], BackendConfig]] = {
    "redis": _parse_redis,
    "mysql": _parse_mysql,
    "sqlite": _parse_sqlite,
}


def parse_config(tree: ConfigTree, base: Path | None = None) -> Config:
    """The typed config of a parsed tree; relative paths are taken relative to ``base``
    (the config file's directory; the working directory if None)."""
    where_from = Path(os.path.abspath(base if base is not None else os.curdir))
    _reject_unknown(tree, "")
    enabled = []
    for name in _BACKENDS:
        sub = _subtree(tree, name, "")
        if _bool(sub, "enable", False, f"{name}."):
            enabled.append(name)
    if not enabled:
        raise ConfigError("redis.enable / mysql.enable / sqlite.enable: no backend is enabled (enable exactly one)")
    if len(enabled) > 1:
        raise ConfigError(f"{'.enable / '.join(enabled)}.enable: more than one backend is enabled (enable exactly one)")
    backend = _BACKENDS[enabled[0]](_subtree(tree, enabled[0], ""), where_from)
    return Config(service=_parse_service(_subtree(tree, "exhook", ""), where_from), backend=backend)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a config file; its relative paths are relative to its directory."""
    file = Path(os.path.abspath(path))
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {file}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file}: cannot read: {first_line(exc)}") from None
    try:
        tree = parse_hocon(text, basedir=str(file.parent))
    except Exception as exc:  # pyhocon raises several unrelated types on syntax errors
        raise ConfigError(f"{file}: cannot parse HOCON: {first_line(exc)}") from None
    return parse_config(tree, file.parent)


def load_config_string(text: str, base: Path | None = None) -> Config:
    """Parse HOCON text (tests and tools); relative paths against ``base`` or the working directory."""
    try:
        tree = parse_hocon(text, basedir=str(base) if base is not None else None)
    except Exception as exc:
        raise ConfigError(f"cannot parse HOCON: {first_line(exc)}") from None
    return parse_config(tree, base)


def config_secrets(cfg: Config) -> tuple[str, ...]:
    """Values that must never appear in logs or printed config: the passwords, the
    API secret, and the secret as it travels (base64 of ``key:secret`` in the
    Authorization header, as an echoed request may show it)."""
    backend = cfg.backend
    password = backend.password if isinstance(backend, (RedisConfig, MysqlConfig)) else ""
    api = cfg.service.emqx
    token = base64.b64encode(f"{api.api_key}:{api.api_secret}".encode()).decode() if api.api_secret else ""
    return tuple(s for s in (password, api.api_secret, token) if s)


def backend_name(backend: BackendConfig) -> str:
    """The config block of ``backend``: ``redis``, ``mysql`` or ``sqlite``."""
    if isinstance(backend, RedisConfig):
        return "redis"
    if isinstance(backend, MysqlConfig):
        return "mysql"
    return "sqlite"


# EMQX's default exhook request_timeout (emqx_exhook_schema): it gives up on a call after it
EMQX_REQUEST_TIMEOUT_MS = 5000


def config_warnings(cfg: Config) -> tuple[str, ...]:
    """What is valid but almost certainly not meant: one line each, naming the field
    (logged at start-up, printed by check-config)."""
    out = []
    where = f"{backend_name(cfg.backend)}.topics"
    topics = cfg.backend.topics
    if not topics:
        out.append(f"{where} is empty: the backend is inactive, no hook is registered and nothing is stored")
    for flt in topics:
        if flt.startswith("$SYS/") or flt == "$SYS":
            out.append(f"{where}: {flt!r} never matches: EMQX does not pass $SYS messages to exhooks")
    if topics and all(flt.startswith("$SYS") for flt in topics):
        out.append(f"{where}: no filter can match a message: nothing will be stored")
    deadline = cfg.service.publish_deadline_ms
    if deadline >= EMQX_REQUEST_TIMEOUT_MS:
        out.append(f"exhook.publish_deadline {format_duration(deadline)} is not below EMQX's default exhook "
                   f"request_timeout ({format_duration(EMQX_REQUEST_TIMEOUT_MS)}): EMQX gives up on message.publish "
                   "first and applies its failed_action; keep it well below (the default is 500ms)")
    if not cfg.service.emqx.api_key:
        out.append("exhook.emqx.api_key is empty: EMQX refuses replays and restores (401) until it is set "
                   "(an API key with the administrator role, e.g. through EMQX_API_KEY / EMQX_API_SECRET)")
    out += _short_secret_warnings(cfg)
    return tuple(out)


# Secrets are masked wherever their text appears in a log line: a very short one turns
# ordinary words into masks (and is weak anyway).
_SHORT_SECRET = 8


def _short_secret_warnings(cfg: Config) -> list[str]:
    backend = cfg.backend
    fields = [("exhook.emqx.api_secret", cfg.service.emqx.api_secret)]
    if isinstance(backend, (RedisConfig, MysqlConfig)):
        fields.append((f"{backend_name(backend)}.password", backend.password))
    return [f"{name} is shorter than {_SHORT_SECRET} characters: it is masked wherever its text appears in the "
            "logs, which garbles them (and it is easy to guess); use a longer one"
            for name, secret in fields if 0 < len(secret) < _SHORT_SECRET]
