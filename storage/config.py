"""Typed settings of the backends (and of the TLS and addresses they use).

These are the ``mysql``, ``redis`` and ``sqlite`` blocks of the config file once
parsed (``exhook.config`` parses and validates the file; the storage layer only
reads these objects, so a store can be built and tested without the service).
Field names follow the Erlang plugin ``emqx_offline_message_plugin`` 2.0.0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


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


# Placeholders a SQL template may use (the plugin renders the same maps).
SQL_PLACEHOLDERS = frozenset(
    {"id", "from", "clientid", "topic", "qos", "flags.retain", "retain", "payload", "timestamp", "new_id"}
)
