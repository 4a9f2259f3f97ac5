"""Configuration: parsed once from HOCON into typed, validated objects.

Field names follow the Erlang plugin ``emqx_offline_message_plugin`` 2.0.0 for the
``mysql`` and ``redis`` blocks; ``sqlite`` and ``exhook`` are this service's own.
Every error is a ``ConfigError`` whose text is one line naming the field.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, TypeVar

from pyhocon import ConfigFactory, ConfigTree  # type: ignore[import-untyped]
from pyhocon.exceptions import ConfigException  # type: ignore[import-untyped]

from exhook.errors import first_line
from exhook.topics import TopicError, validate_filter


class ConfigError(ValueError):
    """An invalid configuration; ``str()`` is one line naming the field."""


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class SslOptions:
    enable: bool = False
    verify: bool = True
    cacertfile: str = ""
    certfile: str = ""
    keyfile: str = ""
    server_name_indication: str = ""


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


@dataclass(frozen=True, slots=True)
class BackendCommon:
    topics: tuple[str, ...] = ()
    batch_size: int = 1
    batch_time_ms: int = 100
    message_ttl: int = 0


@dataclass(frozen=True, slots=True)
class RedisConfig(BackendCommon):
    servers: tuple[HostPort, ...] = (HostPort("127.0.0.1", 6379),)
    redis_type: Literal["single", "sentinel", "cluster"] = "single"
    sentinel: str = ""
    pool_size: int = 8
    username: str = ""
    password: str = field(default="", repr=False)
    database: int = 0
    message_key_prefix: str = "mqtt:msg"
    subscription_key_prefix: str = "mqtt:sub"
    wait_replicas: int = 0
    wait_timeout_ms: int = 1000
    ssl: SslOptions = SslOptions()


SQL_TEMPLATE_FIELDS = (
    "insert_message_sql",
    "delete_message_sql",
    "select_message_sql",
    "insert_subscription_sql",
    "select_subscriptions_sql",
    "delete_subscription_sql",
    "rekey_message_sql",
)

DEFAULT_SQL: dict[str, str] = {
    "insert_message_sql": (
        "insert into mqtt_msg(msgid, sender, topic, qos, retain, payload, arrived) "
        "values(${id}, ${from}, ${topic}, ${qos}, ${flags.retain}, ${payload}, "
        "FROM_UNIXTIME(${timestamp}/1000))"
    ),
    "delete_message_sql": "delete from mqtt_msg where msgid = ${id}",
    "select_message_sql": "select * from mqtt_msg where topic = ${topic}",
    "insert_subscription_sql": (
        "insert into mqtt_sub(clientid, topic, qos) values(${clientid}, ${topic}, ${qos}) "
        "on duplicate key update qos = ${qos}"
    ),
    "select_subscriptions_sql": "select topic, qos from mqtt_sub where clientid = ${clientid}",
    "delete_subscription_sql": "delete from mqtt_sub where clientid = ${clientid} and topic = ${topic}",
    "rekey_message_sql": "update mqtt_msg set msgid = ${new_id} where msgid = ${id}",
}


@dataclass(frozen=True, slots=True)
class MysqlConfig(BackendCommon):
    server: HostPort = HostPort("127.0.0.1", 3306)
    pool_size: int = 8
    username: str = "root"
    password: str = field(default="", repr=False)
    database: str = "mqtt"
    init_default_schema: bool = False
    sql: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_SQL))
    ssl: SslOptions = SslOptions()


@dataclass(frozen=True, slots=True)
class SqliteConfig(BackendCommon):
    path: str = "data/offline-messages.sqlite3"


BackendConfig = RedisConfig | MysqlConfig | SqliteConfig


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
    if number < minimum or (maximum is not None and number > maximum):
        upper = f" and {maximum}" if maximum is not None else ""
        raise ConfigError(f"{where}{key}: must be >= {minimum}{upper}, got {number}")
    return number


_DURATION = re.compile(r"^\s*(\d+)\s*(ms|s|m)?\s*$")


def _duration_ms(tree: ConfigTree, key: str, default: int, where: str, minimum: int = 0) -> int:
    """A duration in milliseconds: an integer (ms, as the plugin's ``batch_time``)
    or a string such as ``"250ms"``, ``"2s"``, ``"1m"``."""
    value = _get(tree, key, default)
    if isinstance(value, bool):
        raise ConfigError(f"{where}{key}: expected a duration, got {value!r}")
    if isinstance(value, timedelta):  # pyhocon reads unquoted 500ms / 2s itself
        value = f"{round(value.total_seconds() * 1000)}ms"
    match = _DURATION.match(str(value))
    if not match:
        raise ConfigError(f"{where}{key}: expected a duration like 500, \"500ms\" or \"2s\", got {value!r}")
    number = int(match.group(1)) * {"ms": 1, None: 1, "s": 1000, "m": 60000}[match.group(2)]
    if number < minimum:
        raise ConfigError(f"{where}{key}: must be at least {minimum} ms, got {number} ms")
    return number


def _str(tree: ConfigTree, key: str, default: str, where: str) -> str:
    value = _get(tree, key, default)
    if isinstance(value, (dict, list, ConfigTree)):
        raise ConfigError(f"{where}{key}: expected a string")
    return str(value)


def parse_host_port(text: str, default_port: int, field_name: str) -> HostPort:
    """``host:port``, ``host`` (default port) or ``[v6]:port``."""
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


def _ssl(tree: ConfigTree, where: str) -> SslOptions:
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
        cacertfile=_str(sub, "cacertfile", "", at),
        certfile=_str(sub, "certfile", "", at),
        keyfile=_str(sub, "keyfile", "", at),
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
                "max_pending_writes", "emqx", "ssl", "http"},
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
        "message_ttl": _int(tree, "message_ttl", ttl_default, where),
    }


def _parse_redis(tree: ConfigTree) -> RedisConfig:
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
        ssl=_ssl(tree, where),
    )


_PLACEHOLDER = re.compile(r"\$\{([^}]*)\}")
SQL_PLACEHOLDERS = frozenset(
    {"id", "from", "clientid", "topic", "qos", "flags.retain", "retain", "payload", "timestamp", "new_id"}
)


def check_sql_template(field_name: str, sql: str) -> None:
    if not sql.strip():
        raise ConfigError(f"{field_name}: empty SQL template")
    for name in _PLACEHOLDER.findall(sql):
        if name not in SQL_PLACEHOLDERS:
            raise ConfigError(f"{field_name}: unknown placeholder ${{{name}}}")


def _parse_mysql(tree: ConfigTree) -> MysqlConfig:
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
        ssl=_ssl(tree, where),
    )


def _parse_sqlite(tree: ConfigTree) -> SqliteConfig:
    where = "sqlite."
    path = _str(tree, "path", "data/offline-messages.sqlite3", where)
    if not path:
        raise ConfigError("sqlite.path: must not be empty")
    return SqliteConfig(**_common(tree, where, ttl_default=0), path=path)


def _server_tls(tree: ConfigTree) -> ServerTlsConfig:
    sub = _subtree(tree, "ssl", "exhook.")
    at = "exhook.ssl."
    verify = _get(sub, "verify", "verify_none")
    if verify not in ("verify_peer", "verify_none"):
        raise ConfigError(f"{at}verify: expected verify_peer or verify_none, got {verify!r}")
    opts = ServerTlsConfig(
        enable=_bool(sub, "enable", False, at),
        certfile=_str(sub, "certfile", "", at),
        keyfile=_str(sub, "keyfile", "", at),
        cacertfile=_str(sub, "cacertfile", "", at),
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


def _http(tree: ConfigTree) -> HttpConfig:
    sub = _subtree(tree, "http", "exhook.")
    at = "exhook.http."
    return HttpConfig(
        enable=_bool(sub, "enable", True, at),
        listen=parse_host_port(_str(sub, "listen", "0.0.0.0:9001", at), 9001, f"{at}listen"),
        check_interval_ms=_duration_ms(sub, "check_interval", 5000, at, minimum=100),
    )


def usable_cpus() -> int:
    """CPUs this process may run on (a cpuset / taskset counts, a CFS quota does not)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _parse_service(tree: ConfigTree) -> ServiceConfig:
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
    return ServiceConfig(
        listen=parse_host_port(_str(tree, "listen", "0.0.0.0:9000", where), 9000, "exhook.listen"),
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
            ssl=_ssl(api, at),
        ),
        ssl=_server_tls(tree),
        http=_http(tree),
    )


_BACKENDS: dict[str, Callable[[ConfigTree], BackendConfig]] = {
    "redis": _parse_redis,
    "mysql": _parse_mysql,
    "sqlite": _parse_sqlite,
}


def parse_config(tree: ConfigTree) -> Config:
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
    backend = _BACKENDS[enabled[0]](_subtree(tree, enabled[0], ""))
    return Config(service=_parse_service(_subtree(tree, "exhook", "")), backend=backend)


def load_config(path: str | os.PathLike[str]) -> Config:
    try:
        tree = ConfigFactory.parse_file(str(path), resolve=True)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except Exception as exc:  # pyhocon raises several unrelated types on syntax errors
        first = first_line(exc)
        raise ConfigError(f"{path}: cannot parse HOCON: {first}") from None
    return parse_config(tree)


def load_config_string(text: str) -> Config:
    """Parse HOCON text (tests and tools)."""
    try:
        tree = ConfigFactory.parse_string(text, resolve=True)
    except Exception as exc:
        first = first_line(exc)
        raise ConfigError(f"cannot parse HOCON: {first}") from None
    return parse_config(tree)


def config_secrets(cfg: Config) -> tuple[str, ...]:
    """Values that must never appear in logs or printed config."""
    backend = cfg.backend
    password = backend.password if isinstance(backend, (RedisConfig, MysqlConfig)) else ""
    return tuple(s for s in (password, cfg.service.emqx.api_secret) if s)
