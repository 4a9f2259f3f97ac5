"""MySQL / MariaDB backend (aiomysql) driven by the Erlang plugin's SQL templates.

Modules, one job each (docs/mysql-schema.md describes tables, templates and guarantees):

* ``store.py``: ``MysqlStore``, the ``Store`` interface put together from the others;
* ``templates.py`` / ``sql_template.py``: the seven templates, ``${var}`` -> bound parameters;
* ``ddl.py``: the default schema; ``schema.py`` / ``columns.py``: what ``open()`` reads
  of the server and the tables, as one frozen ``Schema``;
* ``connection.py``: the pool, deadlines, repeats; ``errors.py``: what a failure means;
* ``checks.py``: every op checked before the first round trip; ``write.py``: the
  transaction of ``write(ops)``;
* ``reads.py``: replay reads; ``bookkeeping.py``: replay marks, tombstones, the pending
  registry; ``subscriptions.py``; ``purge.py``: ``message_ttl``.
"""

from storage.mysql.ddl import DEFAULT_SCHEMA_DDL, STATE_TABLES_DDL
from storage.mysql.store import MysqlStore

__all__ = ["DEFAULT_SCHEMA_DDL", "STATE_TABLES_DDL", "MysqlStore"]
