"""Config.backend -> the Store that implements it (imported lazily, so a backend's
driver is only loaded when it is used)."""

from __future__ import annotations

from storage.base import Store
from storage.config import BackendConfig, MysqlConfig, RedisConfig, SqliteConfig


def create_store(cfg: BackendConfig) -> Store:
    if isinstance(cfg, RedisConfig):
        from storage.redis import RedisStore

        return RedisStore(cfg)
    if isinstance(cfg, MysqlConfig):
        from storage.mysql import MysqlStore

        return MysqlStore(cfg)
    if isinstance(cfg, SqliteConfig):
        from storage.sqlite import SqliteStore

        return SqliteStore(cfg)
    raise TypeError(f"unknown backend config {type(cfg).__name__}")
