"""Embedded SQLite backend: the shipped default, no database server needed.

One job per module:

- ``store``: ``SqliteStore``, the ``Store`` interface over the modules below
- ``connection``: the writer connection and thread, the reader pool (WAL, FULL sync)
- ``schema``: tables created or verified at open; the frozen ``Schema`` found
- ``checks``: values SQLite cannot take, refused per op before a write starts
- ``write``: the ordered write path (one transaction per batch)
- ``errors``: what a failure means (transient, setup, or one op's data)
- ``reads``: replay reads (topics, newest positions, counts, merged pages)
- ``bookkeeping``: replay marks, tombstones, the v2 pending-replay registry
- ``purge``: deleting what has expired
"""

from storage.sqlite.reads import prefix_upper_bound
from storage.sqlite.schema import SCHEMA_VERSION
from storage.sqlite.store import SqliteStore

__all__ = ["SCHEMA_VERSION", "SqliteStore", "prefix_upper_bound"]
