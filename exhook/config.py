"""Configuration: parsed once from HOCON into typed, validated objects.

Field names follow the Erlang plugin ``emqx_offline_message_plugin`` 2.0.0 for the
``mysql`` and ``redis`` blocks; ``sqlite`` and ``exhook`` are this service's own.
Every error is a ``ConfigError`` whose text is one line naming the field.
Relative paths (``sqlite.path``, ``exhook.spool.path``, every ``ssl`` file) are
relative to the config file's directory, whatever the working directory, and are
absolute once parsed. Durations and sizes go through ``exhook.units``.
"""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pyhocon import ConfigTree  # type: ignore[import-untyped]
from yarl import URL

from exhook.config_fields import ConfigError as ConfigError
from exhook.config_fields import (
    check_file_path,
    get_value,
    parse_host_port,
    read_bool,
    read_duration_ms,
    read_duration_s,
    read_host_ports,
    read_int,
    read_path,
    read_size_bytes,
    read_ssl,
    read_str,
    read_subtree,
    read_topics,
)
from exhook.hocon_text import parse_hocon
from storage.base import StoreConfigError
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


@dataclass(frozen=True, slots=True)
class EmqxApiConfig:
    url: str = "http://127.0.0.1:18083"
    api_key: str = field(default="", repr=False)
    api_secret: str = field(default="", repr=False)
    request_timeout_ms: int = 5000
    # the request_timeout of this service in EMQX's exhook config: when the broker gives
    # up on a hook call (EMQX's default 5 s)
    hook_timeout_ms: int = 5000
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
    # how long a replay's re-key waits for its ack in this process (exhook.held_rekeys); 0: not at all
    replay_rekey_hold_ms: int = 1000
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
# the blocks of the file (the readers of one field are in exhook.config_fields)
# ---------------------------------------------------------------------------

_COMMON_FIELDS = {"enable", "topics", "batch_size", "batch_time", "message_ttl"}
_SSL_FIELDS = {"enable", "verify", "cacertfile", "certfile", "keyfile", "server_name_indication"}
_KNOWN_FIELDS: dict[str, set[str]] = {
    "": {"exhook", "redis", "mysql", "sqlite"},
    "exhook.": {"listen", "workers", "publish_deadline", "replay_batch_size", "replay_rekey_hold", "log_level",
                "log_format", "max_pending_writes", "emqx", "ssl", "http", "spool", "allowed_clients"},
    "exhook.spool.": {"path", "max_bytes"},
    "exhook.ssl.": {"enable", "certfile", "keyfile", "cacertfile", "verify"},
    "exhook.http.": {"enable", "listen", "check_interval"},
    "exhook.emqx.": {"api_url", "api_key", "api_secret", "request_timeout", "hook_timeout", "ssl"},
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
        "topics": read_topics(tree, where),
        "batch_size": read_int(tree, "batch_size", 1, where, minimum=1, maximum=10000),
        "batch_time_ms": read_duration_ms(tree, "batch_time", 100, where),
        "message_ttl": read_duration_s(tree, "message_ttl", ttl_default, where),
    }


def _parse_redis(tree: ConfigTree, base: Path) -> RedisConfig:
    where = "redis."
    redis_type = read_str(tree, "redis_type", "single", where)
    if redis_type not in ("single", "sentinel", "cluster"):
        raise ConfigError(
            f"redis.redis_type: unknown value {redis_type!r} (expected single, sentinel or cluster)"
        )
    default_port = 26379 if redis_type == "sentinel" else 6379
    servers = read_host_ports(read_str(tree, "servers", "127.0.0.1:6379", where), default_port, "redis.servers")
    if redis_type == "single" and len(servers) != 1:
        raise ConfigError("redis.servers: redis_type single takes exactly one host:port")
    sentinel = read_str(tree, "sentinel", "", where)
    if redis_type == "sentinel" and not sentinel:
        raise ConfigError("redis.sentinel: the master name is required when redis_type = sentinel")
    msg_prefix = read_str(tree, "message_key_prefix", "mqtt:msg", where)
    sub_prefix = read_str(tree, "subscription_key_prefix", "mqtt:sub", where)
    if not msg_prefix or not sub_prefix or msg_prefix == sub_prefix:
        raise ConfigError("redis.message_key_prefix: must be non-empty and differ from subscription_key_prefix")
    brace = msg_prefix.find("{")
    if redis_type == "cluster" and brace >= 0 and msg_prefix[brace + 1:brace + 2] == "}":
        # an empty hash tag: Redis Cluster hashes each whole key, so the v2 replay
        # registry's key and its call record (one script) cannot share a slot
        raise ConfigError("redis.message_key_prefix: an empty hash tag {} makes every key its own slot in "
                          "cluster mode; remove it or put a name in it ({mqtt}:msg)")
    return RedisConfig(
        **_common(tree, where, ttl_default=7200),
        servers=servers,
        redis_type=redis_type,  # type: ignore[arg-type]
        sentinel=sentinel,
        pool_size=read_int(tree, "pool_size", 8, where, minimum=1, maximum=1024),
        username=read_str(tree, "username", "", where),
        password=read_str(tree, "password", "", where),
        database=read_int(tree, "database", 0, where),
        message_key_prefix=msg_prefix,
        subscription_key_prefix=sub_prefix,
        wait_replicas=read_int(tree, "wait_replicas", 0, where, maximum=16),
        wait_timeout_ms=read_duration_ms(tree, "wait_timeout", 1000, where, minimum=1),
        ssl=read_ssl(tree, where, base),
    )


def _parse_mysql(tree: ConfigTree, base: Path) -> MysqlConfig:
    where = "mysql."
    sql = {name: read_str(tree, name, DEFAULT_SQL[name], where) for name in SQL_TEMPLATE_FIELDS}
    config = MysqlConfig(
        **_common(tree, where, ttl_default=0),
        server=parse_host_port(read_str(tree, "server", "127.0.0.1:3306", where), 3306, "mysql.server"),
        pool_size=read_int(tree, "pool_size", 8, where, minimum=1, maximum=1024),
        username=read_str(tree, "username", "root", where),
        password=read_str(tree, "password", "", where),
        database=read_str(tree, "database", "mqtt", where),
        init_default_schema=read_bool(tree, "init_default_schema", False, where),
        sql=sql,
        ssl=read_ssl(tree, where, base),
    )
    # imported here: the MySQL package loads its driver (~0.2 s), which other backends skip
    from storage.mysql.templates import Templates

    try:  # the store's own compilation, so check-config refuses what start-up would
        Templates.compile(config)
    except StoreConfigError as exc:
        raise ConfigError(str(exc)) from None
    return config


def _parse_sqlite(tree: ConfigTree, base: Path) -> SqliteConfig:
    where = "sqlite."
    path = read_path(tree, "path", "data/offline-messages.sqlite3", where, base)
    if not path:
        raise ConfigError("sqlite.path: must not be empty")
    check_file_path(path, "sqlite.path")
    return SqliteConfig(**_common(tree, where, ttl_default=0), path=path)


def _server_tls(tree: ConfigTree, base: Path) -> ServerTlsConfig:
    sub = read_subtree(tree, "ssl", "exhook.")
    at = "exhook.ssl."
    verify = get_value(sub, "verify", "verify_none")
    if verify not in ("verify_peer", "verify_none"):
        raise ConfigError(f"{at}verify: expected verify_peer or verify_none, got {verify!r}")
    opts = ServerTlsConfig(
        enable=read_bool(sub, "enable", False, at),
        certfile=read_path(sub, "certfile", "", at, base),
        keyfile=read_path(sub, "keyfile", "", at, base),
        cacertfile=read_path(sub, "cacertfile", "", at, base),
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
    _check_server_pem(opts, at)
    return opts


def _check_server_pem(opts: ServerTlsConfig, at: str) -> None:
    """Load the listener's files as PEM now: grpc would only log its own lines and
    fail to bind, which names no field."""
    check = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # no pass phrase: OpenSSL would ask for one on the terminal (grpc takes plain keys only)
        check.load_cert_chain(opts.certfile, opts.keyfile, password=lambda: b"")
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{at}certfile: cannot load {opts.certfile!r} / {opts.keyfile!r}: {exc}") from None
    if opts.cacertfile:
        try:
            check.load_verify_locations(cafile=opts.cacertfile)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"{at}cacertfile: cannot load {opts.cacertfile!r}: {exc}") from None


def _http(tree: ConfigTree, grpc_listen: HostPort) -> HttpConfig:
    sub = read_subtree(tree, "http", "exhook.")
    at = "exhook.http."
    http = HttpConfig(
        enable=read_bool(sub, "enable", True, at),
        listen=parse_host_port(read_str(sub, "listen", "0.0.0.0:9001", at), None, f"{at}listen"),
        check_interval_ms=read_duration_ms(sub, "check_interval", 5000, at, minimum=100),
    )
    if http.enable and _same_socket(http.listen, grpc_listen):
        raise ConfigError(f"{at}listen: {http.listen} takes the port of exhook.listen ({grpc_listen}): "
                          "give the HTTP port its own")
    return http


MAX_WORKERS = 256  # exhook.workers and --workers; 0: one per usable CPU


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


def _spool(tree: ConfigTree, base: Path) -> SpoolConfig:
    sub = read_subtree(tree, "spool", "exhook.")
    at = "exhook.spool."
    path = read_path(sub, "path", _SPOOL_DEFAULT.path, at, base)
    if not path:
        raise ConfigError(f"{at}path: must not be empty")
    check_file_path(path, f"{at}path")
    return SpoolConfig(path=path, max_bytes=read_size_bytes(sub, "max_bytes", _SPOOL_DEFAULT.max_bytes, at,
                                                                minimum=1 << 20))


def _check_spool_apart(spool_path: str, store_path: str) -> None:
    """The spool and the SQLite store must be files of their own: worker 0 of several
    takes the file at ``exhook.spool.path`` over as an earlier run's spool (and deletes
    it), and worker N writes its spool to ``<path>.N``."""
    spool, store = Path(spool_path).resolve(), Path(store_path).resolve()
    suffix = store.name[len(spool.name) + 1:] if store.name.startswith(f"{spool.name}.") else ""
    if store == spool or _same_file(spool, store):
        raise ConfigError(f"exhook.spool.path: {spool_path} is the SQLite store (sqlite.path): "
                          "the spool needs a file of its own")
    if store.parent == spool.parent and suffix.isdigit():
        raise ConfigError(f"exhook.spool.path: worker {suffix} would spool to {store}, the SQLite store "
                          "(sqlite.path): give the spool a file of its own")


def _same_file(a: Path, b: Path) -> bool:
    """Two names of one existing file (a hard link)."""
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _allowed_clients(tree: ConfigTree) -> tuple[str, ...]:
    value = get_value(tree, "allowed_clients", [])
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


# a held re-key keeps an acked copy readable for that long when its ack reaches another
# process: beyond a few seconds that is a window for duplicates, not a saving
_MAX_REKEY_HOLD_MS = 10_000


def _parse_service(tree: ConfigTree, base: Path) -> ServiceConfig:
    where = "exhook."
    api = read_subtree(tree, "emqx", where)
    at = "exhook.emqx."
    url = _api_url(read_str(api, "api_url", "http://127.0.0.1:18083", at))
    level = read_str(tree, "log_level", "info", where).lower()
    if level not in ("debug", "info", "warning", "error", "critical"):
        raise ConfigError(f"exhook.log_level: unknown level {level!r} (debug, info, warning, error)")
    workers = read_int(tree, "workers", 0, where, maximum=MAX_WORKERS)
    log_format = read_str(tree, "log_format", "text", where).lower()
    if log_format not in ("text", "json"):
        raise ConfigError(f"exhook.log_format: expected text or json, got {log_format!r}")
    listen = parse_host_port(read_str(tree, "listen", "0.0.0.0:9000", where), None, "exhook.listen")
    return ServiceConfig(
        listen=listen,
        workers=workers or usable_cpus(),
        publish_deadline_ms=read_duration_ms(tree, "publish_deadline", 500, where, minimum=1),
        replay_batch_size=read_int(tree, "replay_batch_size", 100, where, minimum=1, maximum=10000),
        replay_rekey_hold_ms=read_duration_ms(tree, "replay_rekey_hold", 1000, where, maximum=_MAX_REKEY_HOLD_MS),
        log_level=level,
        log_format=log_format,  # type: ignore[arg-type]
        max_pending_writes=read_int(tree, "max_pending_writes", 10000, where, minimum=1),
        emqx=EmqxApiConfig(
            url=url,
            api_key=read_str(api, "api_key", "", at),
            api_secret=read_str(api, "api_secret", "", at),
            request_timeout_ms=read_duration_ms(api, "request_timeout", 5000, at, minimum=1),
            hook_timeout_ms=read_duration_ms(api, "hook_timeout", 5000, at, minimum=1),
            ssl=_api_ssl(api, at, base, url),
        ),
        ssl=_server_tls(tree, base),
        http=_http(tree, listen),
        spool=_spool(tree, base),
        allowed_clients=_allowed_clients(tree),
    )


_API_URL = "exhook.emqx.api_url"
_API_URL_FORM = "expected http://host:port or https://host:port"
_HOSTNAME = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_.])?$")


def _api_url(text: str) -> str:
    """The base URL of EMQX's REST API, normalised (no trailing ``/``). Anything aiohttp
    would fail on later (a traceback) or that does not belong in it is refused here;
    userinfo is refused without being echoed (``check-config`` prints errors)."""
    if any(c.isspace() for c in text):
        raise ConfigError(f"{_API_URL}: contains whitespace ({_API_URL_FORM})")
    try:
        url = URL(text)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{_API_URL}: {_unparsable(exc, text)} ({_API_URL_FORM})") from None
    _check_api_url(url, text)
    return str(url).rstrip("/")


def _unparsable(exc: Exception, text: str) -> str:
    """Why yarl could not parse ``text``. Its reasons quote no part of the URL, but a
    mangled userinfo is not risked."""
    reason = first_line(exc)
    if "out of range" in reason.lower():
        return "the port must be 1-65535"
    return f"not a valid URL: {'cannot parse it' if '@' in text else reason}"


def _check_api_url(url: URL, text: str) -> None:
    """Refuse what parses but is no base URL of the API (``text`` as written: yarl drops
    an empty ``?`` or ``#``)."""
    if url.scheme not in ("http", "https"):
        raise ConfigError(f"{_API_URL}: the scheme must be http or https ({_API_URL_FORM})")
    if url.user is not None or url.password is not None or "@" in (url.raw_authority or ""):
        raise ConfigError(f"{_API_URL}: must not carry credentials (user:password@): "
                          "set exhook.emqx.api_key and api_secret")
    if not url.raw_host or not _valid_host(url):
        raise ConfigError(f"{_API_URL}: no valid host ({_API_URL_FORM})")
    if url.explicit_port is not None and not 0 < url.explicit_port < 65536:
        raise ConfigError(f"{_API_URL}: the port must be 1-65535 ({_API_URL_FORM})")
    if url.raw_path not in ("", "/"):
        # the client adds /api/v5/... to this base: a prefix would be dropped or refused
        raise ConfigError(f"{_API_URL}: must have no path, the service adds /api/v5/... itself ({_API_URL_FORM})")
    if "?" in text or "#" in text:
        raise ConfigError(f"{_API_URL}: must have no query or fragment ({_API_URL_FORM})")


def _valid_host(url: URL) -> bool:
    host = url.host or ""
    if ":" in host:  # only a bracketed IPv6 address holds colons
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return False
        return True
    return bool(_HOSTNAME.match(url.raw_host or ""))


def _api_ssl(api: ConfigTree, at: str, base: Path, url: str) -> SslOptions:
    opts = read_ssl(api, at, base)
    if opts.enable and not url.lower().startswith("https://"):
        # the API key and secret would go out in clear text
        raise ConfigError(f"{at}ssl.enable: TLS needs an https:// api_url, got {url!r}")
    return opts


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
        sub = read_subtree(tree, name, "")
        if read_bool(sub, "enable", False, f"{name}."):
            enabled.append(name)
    if not enabled:
        raise ConfigError("redis.enable / mysql.enable / sqlite.enable: no backend is enabled (enable exactly one)")
    if len(enabled) > 1:
        raise ConfigError(f"{'.enable / '.join(enabled)}.enable: more than one backend is enabled (enable exactly one)")
    backend = _BACKENDS[enabled[0]](read_subtree(tree, enabled[0], ""), where_from)
    service = _parse_service(read_subtree(tree, "exhook", ""), where_from)
    if isinstance(backend, SqliteConfig):
        _check_spool_apart(service.spool.path, backend.path)
    return Config(service=service, backend=backend)


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


def backend_name(backend: BackendConfig) -> str:
    """The config block of ``backend``: ``redis``, ``mysql`` or ``sqlite``."""
    if isinstance(backend, RedisConfig):
        return "redis"
    if isinstance(backend, MysqlConfig):
        return "mysql"
    return "sqlite"
