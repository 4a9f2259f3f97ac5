"""The service under test as a subprocess (``python -m exhook --config FILE --workers N``)
and its backends: a fresh namespace per run (Redis key prefix, MariaDB database,
SQLite file in a temp dir), a way to count the stored messages, and cleanup."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
from prometheus_client.parser import text_string_to_metric_families

from bench.common import CHANNEL_OPTIONS, EMQX_VERSION, HOST, cpu_seconds, free_port, proto, rss_bytes

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("sqlite", "mysql", "redis")
# the REST credentials the service is given (the stand-in ignores them, the emulator checks them)
API_KEY = "bench"
API_SECRET = "bench-secret"
REDIS_ADDR = (HOST, 6379)
MYSQL_ADDR = (HOST, 3306)


def missing_backend(name: str) -> str | None:
    """Why the service cannot run on ``name`` (None = it can)."""
    module = f"storage.{name}"
    if importlib.util.find_spec(module) is None:
        return f"storage/{name}/ does not exist (yet)"
    try:
        __import__(module)
    except Exception as exc:
        return f"{module} does not import: {type(exc).__name__}: {exc}"
    return None


class Backend:
    name = ""

    def __init__(self, tag: str, workdir: Path) -> None:
        self.tag = tag
        self.workdir = workdir

    async def setup(self) -> None: ...

    def add_topics(self, topics: list[str]) -> None:
        """Topics ``count`` must look at (only Redis counts per topic)."""

    def hocon(self, batch_size: int, batch_time_ms: int) -> str:
        raise NotImplementedError

    async def count(self) -> int | None:
        """Stored messages right now (None: cannot tell)."""
        return None

    async def cleanup(self) -> None: ...

    async def server_stats(self) -> dict[str, int]:
        """Server-wide counters to tell round trips and statements per message
        (shared with anything else using the same server: a diagnostic)."""
        return {}


class RedisBackend(Backend):
    name = "redis"

    def __init__(self, tag: str, workdir: Path, topics: list[str]) -> None:
        super().__init__(tag, workdir)
        self.prefix = f"bench:{tag}"
        self.topics = set(topics)

    def add_topics(self, topics: list[str]) -> None:
        self.topics.update(topics)

    def _client(self) -> Any:
        import redis.asyncio as aioredis

        return aioredis.Redis(host=REDIS_ADDR[0], port=REDIS_ADDR[1])

    async def setup(self) -> None:
        client = self._client()
        try:
            await client.ping()
        finally:
            await client.aclose()

    def hocon(self, batch_size: int, batch_time_ms: int) -> str:
        return f"""redis {{
  enable = true
  servers = "{REDIS_ADDR[0]}:{REDIS_ADDR[1]}"
  redis_type = single
  topics = ["bench/#"]
  message_key_prefix = "{self.prefix}:msg"
  subscription_key_prefix = "{self.prefix}:sub"
  message_ttl = 7200
  batch_size = {batch_size}
  batch_time = {batch_time_ms}
}}"""

    async def count(self) -> int | None:
        # the plugin's layout: one sorted set per topic, {message_key_prefix}:{topic}
        client = self._client()
        try:
            pipe = client.pipeline(transaction=False)
            for topic in sorted(self.topics):
                pipe.zcard(f"{self.prefix}:msg:{topic}")
            return int(sum(await pipe.execute()))
        except Exception:
            return None
        finally:
            await client.aclose()

    async def server_stats(self) -> dict[str, int]:
        client = self._client()
        try:
            info = await client.info("stats")
            return {"round trips": int(info.get("total_reads_processed", 0)),
                    "commands": int(info.get("total_commands_processed", 0))}
        except Exception:
            return {}
        finally:
            await client.aclose()

    async def cleanup(self) -> None:
        client = self._client()
        try:
            batch = []
            async for key in client.scan_iter(match=f"{self.prefix}:*", count=5000):
                batch.append(key)
                if len(batch) >= 5000:
                    await client.unlink(*batch)
                    batch = []
            if batch:
                await client.unlink(*batch)
        finally:
            await client.aclose()


class MysqlBackend(Backend):
    name = "mysql"

    def __init__(self, tag: str, workdir: Path) -> None:
        super().__init__(tag, workdir)
        self.database = f"bench_{tag}"

    def _connect(self, database: str | None = None) -> Any:
        import pymysql

        return pymysql.connect(host=MYSQL_ADDR[0], port=MYSQL_ADDR[1], user="root", password="",
                               database=database, autocommit=True)

    def _sql(self, sql: str, database: str | None = None) -> list[Any]:
        conn = self._connect(database)
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
                return list(cur.fetchall())
        finally:
            conn.close()

    async def setup(self) -> None:
        await asyncio.to_thread(self._sql, f"CREATE DATABASE `{self.database}`")

    def hocon(self, batch_size: int, batch_time_ms: int) -> str:
        return f"""mysql {{
  enable = true
  server = "{MYSQL_ADDR[0]}:{MYSQL_ADDR[1]}"
  username = "root"
  password = ""
  database = "{self.database}"
  init_default_schema = true
  topics = ["bench/#"]
  batch_size = {batch_size}
  batch_time = {batch_time_ms}
}}"""

    async def count(self) -> int | None:
        try:
            rows = await asyncio.to_thread(self._sql, "SELECT COUNT(*) FROM mqtt_msg", self.database)
            return int(rows[0][0])
        except Exception:
            return None

    async def server_stats(self) -> dict[str, int]:
        try:
            rows = await asyncio.to_thread(
                self._sql, "SHOW GLOBAL STATUS WHERE Variable_name IN ('Com_commit', 'Questions', 'Com_insert')")
        except Exception:
            return {}
        names = {"Com_commit": "commits", "Questions": "statements", "Com_insert": "inserts"}
        return {names[str(k)]: int(v) for k, v in rows if str(k) in names}

    async def cleanup(self) -> None:
        await asyncio.to_thread(self._sql, f"DROP DATABASE IF EXISTS `{self.database}`")


def sqlite_message_table(path: str) -> str | None:
    """The table of stored messages in the service's SQLite file: the one with a
    payload column (the sqlite store names its own tables)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in sorted(tables, key=lambda t: (t != "mqtt_msg", t)):
            cols = [r[1] for r in conn.execute(f'PRAGMA table_info("{table}")')]
            if "payload" in cols:
                return str(table)
        return None
    finally:
        conn.close()


class SqliteBackend(Backend):
    name = "sqlite"

    @property
    def path(self) -> str:
        return str(self.workdir / f"offline-{self.tag}.sqlite3")

    def hocon(self, batch_size: int, batch_time_ms: int) -> str:
        return f"""sqlite {{
  enable = true
  path = "{self.path}"
  topics = ["bench/#"]
  batch_size = {batch_size}
  batch_time = {batch_time_ms}
}}"""

    def _count(self) -> int | None:
        table = sqlite_message_table(self.path)
        if table is None:
            return None
        conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=5)
        try:
            return int(conn.execute(f'SELECT COUNT(*) FROM "{table}"').fetchone()[0])
        finally:
            conn.close()

    async def count(self) -> int | None:
        try:
            return await asyncio.to_thread(self._count)
        except Exception:
            return None


def make_backend(name: str, tag: str, workdir: Path, topics: list[str]) -> Backend:
    if name == "redis":
        return RedisBackend(tag, workdir, topics)
    if name == "mysql":
        return MysqlBackend(tag, workdir)
    return SqliteBackend(tag, workdir)


class ServiceProc:
    """``python -m exhook`` in its own session (so the whole tree can be stopped)."""

    cpus: tuple[int, ...] = ()

    def __init__(self, backend: Backend, workers: int, batch_size: int, batch_time_ms: int, api_port: int,
                 workdir: Path, cpus: tuple[int, ...] = (), name: str = "", hook_timeout_s: float = 5.0) -> None:
        self.cpus = cpus
        self.port = free_port()
        self.http_port = free_port()
        self.workers = workers
        self.workdir = workdir
        name = name or backend.name
        self.config_path = workdir / f"{name}.hocon"
        self.log_path = workdir / f"{name}.log"
        self.config_path.write_text(f"""exhook {{
  listen = "{HOST}:{self.port}"
  workers = {workers}
  http {{ listen = "{HOST}:{self.http_port}" }}
  log_level = info
  emqx {{
    api_url = "http://{HOST}:{api_port}"
    api_key = "{API_KEY}"
    api_secret = "{API_SECRET}"
    hook_timeout = {round(hook_timeout_s * 1000)}ms
  }}
}}
{backend.hocon(batch_size, batch_time_ms)}
""")
        self.proc: subprocess.Popen[bytes] | None = None

    def _pin(self) -> None:
        """In the child before exec: its CPU affinity (its workers inherit it)."""
        if self.cpus:
            os.sched_setaffinity(0, self.cpus)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "exhook", "--config", str(self.config_path), "--workers", str(self.workers)]

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.argv(), cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=self._pin)

    async def wait_ready(self, protocol: str = "v3", timeout: float = 60.0) -> list[tuple[str, list[str]]]:
        """Until ``OnProviderLoaded`` (of the ``protocol`` package, as that broker generation
        would call it) answers on every worker's port (one call per connection; with several
        workers the kernel spreads the connections). Returns the hooks it registered."""
        deadline = time.monotonic() + timeout
        p = proto(protocol)
        request = p.pb.ProviderLoadedRequest(
            broker=p.pb.BrokerInfo(version=EMQX_VERSION[protocol], sysdescr="EMQX"), meta=p.meta)
        while True:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"the server exited at start-up:\n{self.log_tail()}")
            try:
                async with grpc.aio.insecure_channel(f"{HOST}:{self.port}", options=CHANNEL_OPTIONS) as ch:
                    call = ch.unary_unary(p.path("OnProviderLoaded"),
                                          request_serializer=p.pb.ProviderLoadedRequest.SerializeToString,
                                          response_deserializer=p.pb.LoadedResponse.FromString)
                    answer = await call(request, timeout=2)
                    if answer.hooks and len(self.children()) >= (self.workers if self.workers > 1 else 0):
                        await asyncio.sleep(0.5 if self.workers > 1 else 0)
                        return [(h.name, list(h.topics)) for h in answer.hooks]
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() >= deadline:
                raise RuntimeError(f"the service did not answer OnProviderLoaded within {timeout:.0f} s:\n"
                                   f"{self.log_tail()}")
            await asyncio.sleep(0.2)

    def children(self) -> list[int]:
        from bench.common import process_tree

        return process_tree(self.pid)[1:]

    def rss(self) -> int:
        return rss_bytes(self.pid)

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join("    " + line for line in text[-lines:])

    def counters(self) -> dict[str, float]:
        """The service's counters from its ``/metrics`` (summed over its workers by the
        service itself), as ``name`` or ``name{label}`` without the prefix; {} if it is gone."""
        try:
            with urllib.request.urlopen(f"http://{HOST}:{self.http_port}/metrics", timeout=5) as resp:
                text = resp.read().decode()
        except OSError:
            return {}
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.endswith(("_total", "_sum", "_count")):
                    label = ",".join(sample.labels.values())
                    name = sample.name.removeprefix("offline_exhook_")
                    out[f"{name}{{{label}}}" if label else name] = sample.value
        return out

    def log_lines(self, pattern: str) -> list[str]:
        try:
            return [line for line in self.log_path.read_text(errors="replace").splitlines() if pattern in line]
        except OSError:
            return []

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (graceful: flushes writes), then SIGKILL of its process group."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: only its workers
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)


class NoopProc(ServiceProc):
    """The no-op server, started and measured like the service, registering ``hooks``."""

    def __init__(self, workers: int, workdir: Path, cpus: tuple[int, ...] = (),
                 hooks: list[tuple[str, list[str]]] | None = None) -> None:
        self.cpus = cpus
        self.port = free_port()
        self.http_port = 0
        self.workers = workers
        self.workdir = workdir
        self.log_path = workdir / f"noop-{self.port}.log"
        self.hooks = hooks
        self.proc = None

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "bench.noop", "--port", str(self.port), "--workers", str(self.workers)]
        if self.hooks is not None:
            argv += ["--hooks", json.dumps(self.hooks)]
        return argv

    def counters(self) -> dict[str, float]:
        return {}


async def service_hook_specs(workdir: Path, protocol: str = "v3") -> list[tuple[str, list[str]]]:
    """The hooks the service registers (its ``OnProviderLoaded`` answer) with ``topics =
    ["bench/#"]``, asked from a short-lived instance on SQLite."""
    backend = SqliteBackend("hookspec", workdir)
    proc = ServiceProc(backend, 1, 1, 0, free_port(), workdir, name="hookspec")
    proc.start()
    try:
        return await proc.wait_ready(protocol, timeout=30)
    finally:
        proc.stop()


def workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="offline-exhook-bench-"))


def remove_workdir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


async def wait_drain(backend: Backend, target: int, timeout: float, stall: float = 15.0) -> tuple[bool, int | None]:
    """Until the store holds at most ``target`` messages; (reached, count). Gives up after
    ``timeout`` s, or when the count did not move for ``stall`` s."""
    start = time.monotonic()
    last, since = None, start
    while True:
        n = await backend.count()
        if n is None:
            return False, None
        now = time.monotonic()
        if n <= target:
            return True, n
        if n != last:
            last, since = n, now
        if now - since > stall or now - start > timeout:
            return False, n
        await asyncio.sleep(0.1)


async def wait_stored(backend: Backend, target: int, timeout: float) -> int | None:
    """Until the store holds at least ``target`` messages (the writes were flushed); the count."""
    deadline = time.monotonic() + timeout
    while True:
        n = await backend.count()
        if n is None or n >= target or time.monotonic() >= deadline:
            return n
        await asyncio.sleep(0.1)
