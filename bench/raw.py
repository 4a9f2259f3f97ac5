"""The raw backend ceiling: the same writes as the service, straight to the backend
from one connection, batches of ``batch`` messages, one batch after the other (what
one ordered writer can at best do), then the deletes of those messages.

- Redis: a pipeline of ``batch`` x (HSET of the plugin's 7 fields, ZADD, EXPIRE,
  ZREMRANGEBYSCORE); deletes: ``batch`` x (DEL, ZREM).
- MariaDB (aiomysql): one multi-row INSERT of ``batch`` rows + COMMIT, in a table with
  the service's own schema when it created one (``CREATE TABLE ... LIKE mqtt_msg``);
  deletes: ``DELETE ... WHERE msgid IN (batch ids)`` + COMMIT.
- SQLite: ``executemany`` of ``batch`` rows in one transaction (WAL, synchronous=FULL
  like the service unless told otherwise), the service's table schema when it can be read.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import time
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from bench.common import GuidGen, payload_bytes
from bench.service import MYSQL_ADDR, REDIS_ADDR, sqlite_message_table

# "DROP TABLE IF EXISTS" of a table that is not there is a MySQL note, not news
warnings.filterwarnings("ignore", message="Unknown table", module=r"aiomysql")


@dataclass(slots=True)
class RawResult:
    write_rate: float
    delete_rate: float
    messages: int
    note: str = ""


def _ids(n: int, gen: GuidGen) -> list[str]:
    return [gen.gen().decode() for _ in range(n)]


async def _timed_batches(seconds: float, batch: int, write_batch: Callable[[list[str]], Awaitable[None]],
                         gen: GuidGen) -> tuple[int, float, list[list[str]]]:
    written: list[list[str]] = []
    n = 0
    start = time.monotonic()
    end = start + seconds
    while time.monotonic() < end:
        ids = _ids(batch, gen)
        await write_batch(ids)
        written.append(ids)
        n += batch
    return n, time.monotonic() - start, written


async def redis_ceiling(seconds: float, batch: int, payload_size: int, topics: list[str], tag: str) -> RawResult:
    import redis.asyncio as aioredis

    client = aioredis.Redis(host=REDIS_ADDR[0], port=REDIS_ADDR[1], single_connection_client=True)
    prefix = f"bench:{tag}:raw"
    payload = payload_bytes(payload_size)
    gen = GuidGen(0xBA5E)
    rnd = random.Random(1)
    where: dict[str, str] = {}
    ttl = 7200

    async def write(ids: list[str]) -> None:
        pipe = client.pipeline(transaction=False)
        now = time.time() * 1000
        for msgid in ids:
            topic = topics[rnd.randrange(len(topics))]
            where[msgid] = topic
            key = f"{prefix}:{msgid}"
            pipe.hset(key, mapping={"id": msgid, "from": "bench-pub-1", "qos": 1, "topic": topic,
                                    "payload": payload, "ts": int(now), "retain": "false"})
            pipe.zadd(f"{prefix}:{topic}", {msgid: now})
            pipe.expire(key, ttl)
            pipe.zremrangebyscore(f"{prefix}:{topic}", "-inf", now - ttl * 1000)
        await pipe.execute()

    async def delete(ids: list[str]) -> None:
        pipe = client.pipeline(transaction=False)
        for msgid in ids:
            pipe.delete(f"{prefix}:{msgid}")
            pipe.zrem(f"{prefix}:{where[msgid]}", msgid)
        await pipe.execute()

    try:
        n, elapsed, written = await _timed_batches(seconds, batch, write, gen)
        start = time.monotonic()
        for ids in written:
            await delete(ids)
        del_elapsed = time.monotonic() - start
        return RawResult(n / elapsed, n / del_elapsed, n, "redis-py (hiredis), 1 connection, pipelines")
    finally:
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*", count=5000)]
        for i in range(0, len(keys), 5000):
            await client.unlink(*keys[i:i + 5000])
        await client.aclose()


_MYSQL_DDL = """CREATE TABLE `{table}` (
  id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
  msgid VARCHAR(64) NOT NULL, topic VARCHAR(180) NOT NULL, sender VARCHAR(64),
  qos TINYINT NOT NULL, retain TINYINT, payload BLOB, arrived DATETIME NOT NULL,
  KEY (msgid), KEY (topic, id)) ENGINE=InnoDB"""


async def mysql_ceiling(seconds: float, batch: int, payload_size: int, topics: list[str],
                        database: str) -> RawResult:
    import aiomysql

    conn = await aiomysql.connect(host=MYSQL_ADDR[0], port=MYSQL_ADDR[1], user="root", password="",
                                  db=database, autocommit=False)
    table = "bench_raw_msg"
    payload = payload_bytes(payload_size)
    gen = GuidGen(0xBA5F)
    rnd = random.Random(1)
    try:
        async with conn.cursor() as cur:
            await cur.execute(f"DROP TABLE IF EXISTS `{table}`")
            await cur.execute("SHOW TABLES LIKE 'mqtt_msg'")
            if await cur.fetchone():
                await cur.execute(f"CREATE TABLE `{table}` LIKE mqtt_msg")
                note = "schema of the service's mqtt_msg"
            else:
                await cur.execute(_MYSQL_DDL.format(table=table))
                note = "own schema (the service created none)"
        await conn.commit()
        row = "(%s, %s, %s, %s, %s, %s, FROM_UNIXTIME(%s/1000))"
        insert = (f"INSERT INTO `{table}` (msgid, sender, topic, qos, retain, payload, arrived) VALUES "
                  + ", ".join([row] * batch))

        async def write(ids: list[str]) -> None:
            now = int(time.time() * 1000)
            args: list[object] = []
            for msgid in ids:
                args += [msgid, "bench-pub-1", topics[rnd.randrange(len(topics))], 1, 0, payload, now]
            async with conn.cursor() as cur:
                await cur.execute(insert, args)
            await conn.commit()

        delete = f"DELETE FROM `{table}` WHERE msgid IN ({', '.join(['%s'] * batch)})"
        n, elapsed, written = await _timed_batches(seconds, batch, write, gen)
        start = time.monotonic()
        for ids in written:
            async with conn.cursor() as cur:
                await cur.execute(delete, ids)
            await conn.commit()
        del_elapsed = time.monotonic() - start
        async with conn.cursor() as cur:
            await cur.execute(f"DROP TABLE IF EXISTS `{table}`")
        await conn.commit()
        return RawResult(n / elapsed, n / del_elapsed, n, f"aiomysql, 1 connection, {note}")
    finally:
        conn.close()


_SQLITE_DDL = (
    """CREATE TABLE mqtt_msg (id INTEGER PRIMARY KEY AUTOINCREMENT, msgid TEXT NOT NULL, topic TEXT NOT NULL,
       sender TEXT NOT NULL DEFAULT '', qos INTEGER NOT NULL, retain INTEGER NOT NULL DEFAULT 0,
       payload BLOB NOT NULL, arrived INTEGER NOT NULL)""",
    "CREATE INDEX mqtt_msg_topic ON mqtt_msg(topic)",
    "CREATE UNIQUE INDEX mqtt_msg_msgid ON mqtt_msg(msgid)",
)
_SQLITE_INSERT = ('INSERT OR IGNORE INTO "{t}" (msgid, sender, topic, qos, retain, payload, arrived) '
                  "VALUES (?, ?, ?, ?, ?, ?, ?)")


def _sqlite_schema(service_db: str | None) -> tuple[str, list[str], str]:
    """(table, DDL, note): the service's message table when its file can be read, else our own."""
    table = sqlite_message_table(service_db) if service_db and Path(service_db).exists() else None
    if table is None or service_db is None:
        return "mqtt_msg", list(_SQLITE_DDL), "own schema"
    source = sqlite3.connect(f"file:{service_db}?mode=ro", uri=True)
    try:
        ddl = [r[0] for r in source.execute(
            "SELECT sql FROM sqlite_master WHERE tbl_name = ? AND sql IS NOT NULL ORDER BY type DESC", (table,))]
    finally:
        source.close()
    return table, ddl, f"schema of the service's {table}"


def _sqlite_run(path: Path, service_db: str | None, seconds: float, batch: int, payload_size: int,
                topics: list[str], synchronous: str) -> RawResult:
    table, ddl, note = _sqlite_schema(service_db)
    conn = sqlite3.connect(str(path), isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    for stmt in ddl:
        conn.execute(stmt)
    payload = payload_bytes(payload_size)
    gen = GuidGen(0xBA60)
    rnd = random.Random(1)
    insert = _SQLITE_INSERT.format(t=table)
    written: list[list[str]] = []
    n = 0
    start = time.monotonic()
    while time.monotonic() < start + seconds:
        ids = _ids(batch, gen)
        now = int(time.time() * 1000)
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(insert, [(i, "bench-pub-1", topics[rnd.randrange(len(topics))], 1, 0, payload, now)
                                  for i in ids])
        conn.execute("COMMIT")
        written.append(ids)
        n += batch
    elapsed = time.monotonic() - start
    start = time.monotonic()
    delete = f'DELETE FROM "{table}" WHERE msgid = ?'
    for ids in written:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(delete, [(i,) for i in ids])
        conn.execute("COMMIT")
    del_elapsed = time.monotonic() - start
    conn.close()
    return RawResult(n / elapsed, n / del_elapsed, n, f"sqlite3, WAL, synchronous={synchronous}, {note}")


def _remove(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


async def sqlite_ceiling(seconds: float, batch: int, payload_size: int, topics: list[str], workdir: Path,
                         service_db: str | None, synchronous: str = "FULL") -> RawResult:
    path = workdir / "raw.sqlite3"
    try:
        try:
            return await asyncio.to_thread(_sqlite_run, path, service_db, seconds, batch, payload_size, topics,
                                           synchronous)
        except sqlite3.Error as exc:
            if service_db is None:
                raise
            _remove(path)  # the service's schema did not take our rows: measure with our own
            result = await asyncio.to_thread(_sqlite_run, path, None, seconds, batch, payload_size, topics,
                                             synchronous)
            result.note += f" (service schema failed: {exc})"
            return result
    finally:
        _remove(path)


# -- what ONE commit costs (issue 11 item 3) ---------------------------------------------
@dataclass(slots=True)
class CommitCost:
    """One single-row INSERT + COMMIT, one after the other, from one connection."""

    backend: str
    p50_ms: float
    p99_ms: float
    n: int
    baseline_ms: float   # the same without the durable part (see ``note``)
    note: str


def _p(values: list[float], q: float) -> float:
    from bench.common import percentile

    return percentile(sorted(values), q) * 1e3


def _sqlite_commits(path: Path, service_db: str | None, count: int, payload_size: int,
                    synchronous: str) -> list[float]:
    table, ddl, _ = _sqlite_schema(service_db)
    conn = sqlite3.connect(str(path), isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={synchronous}")
        for stmt in ddl:
            conn.execute(stmt)
        insert = _SQLITE_INSERT.format(t=table)
        payload = payload_bytes(payload_size)
        gen = GuidGen(0xC0FF)
        times = []
        for _ in range(count):
            t0 = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(insert, (gen.gen().decode(), "bench-pub-1", "bench/t/0", 1, 0, payload,
                                  int(time.time() * 1000)))
            conn.execute("COMMIT")
            times.append(time.perf_counter() - t0)
        return times
    finally:
        conn.close()


async def sqlite_commit_cost(workdir: Path, service_db: str | None, count: int, payload_size: int) -> CommitCost:
    """synchronous=FULL (the service's setting: the WAL is fsynced at every commit) against
    synchronous=NORMAL (WAL, no fsync at commit): the difference is the fsync."""
    out: dict[str, list[float]] = {}
    for mode in ("FULL", "NORMAL"):
        path = workdir / f"commit-{mode}.sqlite3"
        try:
            out[mode] = await asyncio.to_thread(_sqlite_commits, path, service_db, count, payload_size, mode)
        finally:
            _remove(path)
    full = out["FULL"]
    return CommitCost("sqlite", _p(full, 50), _p(full, 99), len(full), _p(out["NORMAL"], 50),
                      "WAL, synchronous=FULL (fsync of the WAL per commit); baseline = synchronous=NORMAL "
                      "(no fsync at commit)")


async def mysql_commit_cost(database: str, count: int, payload_size: int) -> CommitCost:
    """Single-row INSERT + COMMIT with the server's own durability settings (read and
    reported), against a ``SELECT 1`` round trip on the same connection."""
    import aiomysql

    conn = await aiomysql.connect(host=MYSQL_ADDR[0], port=MYSQL_ADDR[1], user="root", password="",
                                  db=database, autocommit=False)
    table = "bench_commit_msg"
    try:
        async with conn.cursor() as cur:
            await cur.execute("SELECT @@innodb_flush_log_at_trx_commit, @@sync_binlog, @@log_bin")
            flush, sync_binlog, log_bin = await cur.fetchone()
            await cur.execute(f"DROP TABLE IF EXISTS `{table}`")
            await cur.execute("SHOW TABLES LIKE 'mqtt_msg'")
            if await cur.fetchone():
                await cur.execute(f"CREATE TABLE `{table}` LIKE mqtt_msg")
            else:
                await cur.execute(_MYSQL_DDL.format(table=table))
        await conn.commit()
        insert = (f"INSERT INTO `{table}` (msgid, sender, topic, qos, retain, payload, arrived) "
                  "VALUES (%s, %s, %s, %s, %s, %s, FROM_UNIXTIME(%s/1000))")
        payload = payload_bytes(payload_size)
        gen = GuidGen(0xC100)
        times, rtt = [], []
        for _ in range(count):
            t0 = time.perf_counter()
            async with conn.cursor() as cur:
                await cur.execute(insert, (gen.gen().decode(), "bench-pub-1", "bench/t/0", 1, 0, payload,
                                           int(time.time() * 1000)))
            await conn.commit()
            times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            async with conn.cursor() as cur:
                await cur.execute("SELECT 1")
                await cur.fetchone()
            rtt.append(time.perf_counter() - t0)
        async with conn.cursor() as cur:
            await cur.execute(f"DROP TABLE IF EXISTS `{table}`")
        await conn.commit()
    finally:
        conn.close()
    return CommitCost("mysql", _p(times, 50), _p(times, 99), len(times), _p(rtt, 50),
                      f"InnoDB, innodb_flush_log_at_trx_commit={flush}, log_bin={log_bin}, "
                      f"sync_binlog={sync_binlog} (as this server is configured); baseline = SELECT 1 round trip")


async def redis_commit_cost(count: int, payload_size: int, tag: str) -> CommitCost:
    """One message's write (the plugin layout's HSET, ZADD, EXPIRE, ZREMRANGEBYSCORE in one
    pipeline), one after the other, against a PING round trip; with the server's
    persistence settings (read and reported: an fsync per write only with appendfsync always)."""
    import redis.asyncio as aioredis

    client = aioredis.Redis(host=REDIS_ADDR[0], port=REDIS_ADDR[1], single_connection_client=True)
    prefix = f"bench:{tag}:commit"
    payload = payload_bytes(payload_size)
    gen = GuidGen(0xC200)
    try:
        conf: dict[str, str] = {}
        for key in ("appendonly", "appendfsync"):
            try:
                conf.update({str(k): str(v) for k, v in (await client.config_get(key)).items()})
            except Exception:  # CONFIG may be renamed or denied: the figure stands without it
                conf[key] = "?"
        times, rtt = [], []
        for _ in range(count):
            msgid = gen.gen().decode()
            now = time.time() * 1000
            t0 = time.perf_counter()
            pipe = client.pipeline(transaction=False)
            pipe.hset(f"{prefix}:{msgid}", mapping={"id": msgid, "from": "bench-pub-1", "qos": 1, "topic": "bench/t/0",
                                                    "payload": payload, "ts": int(now), "retain": "false"})
            pipe.zadd(f"{prefix}:bench/t/0", {msgid: now})
            pipe.expire(f"{prefix}:{msgid}", 7200)
            pipe.zremrangebyscore(f"{prefix}:bench/t/0", "-inf", now - 7200 * 1000)
            await pipe.execute()
            times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            await client.ping()
            rtt.append(time.perf_counter() - t0)
    finally:
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*", count=5000)]
        for i in range(0, len(keys), 5000):
            await client.unlink(*keys[i:i + 5000])
        await client.aclose()
    return CommitCost("redis", _p(times, 50), _p(times, 99), len(times), _p(rtt, 50),
                      f"one message's 4 commands in one pipeline; appendonly={conf.get('appendonly', '?')}, "
                      f"appendfsync={conf.get('appendfsync', '?')} (as this server is configured); baseline = PING")
