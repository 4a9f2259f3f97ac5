"""messages, subscriptions, purge and rebuild-topic-index against real stores: SQLite (a file), Redis (the
machine's server on 6379, and the cluster of the fixtures) and MariaDB (127.0.0.1:3306). Every test has
its own SQLite file / Redis key prefix / MySQL database, removed afterwards."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiomysql
import pytest
import redis.asyncio as aioredis

from exhook.cli import output, stored
from exhook.config import Config, RedisConfig, load_config
from storage.base import Store
from storage.factory import create_store
from storage.model import SaveMessage, StoredMessage
from storage.redis import REDIS_COMMANDS
from storage.redis.reads import Reader
from tests.cli_run import run_cli
from tests.e2e.harness import free_port
from tests.redis_fixtures import RedisTopologies
from tests.redis_servers import AclUser

pytest_plugins = ["tests.redis_fixtures"]

ROOT = Path(__file__).resolve().parent.parent
T0 = 1_700_000_000_000  # whole seconds: MySQL's `arrived` (datetime) keeps no milliseconds
SEED: list[tuple[str, bytes]] = [
    ("a/1", b"first"),
    ("a/2", b"second\nline"),
    ("a/b/c", b"\xff\xfe\x00"),
    ("other/x", b"not me"),
    ("a/1", b"x" * 60),
    ("a/2", b"last"),
]
PREVIEWS = ["first", "second\\nline", "hex:fffe00", "not me", "x" * 48 + "...", "last"]


def seed_messages() -> list[StoredMessage]:
    # GUID-like ids: their first 64 bits are the microsecond clock Redis scores by, so arrival order is id order
    base_us = time.time_ns() // 1000
    return [StoredMessage(f"{base_us + i:016X}{i:016X}", f"pub{i}", topic, 1 + i % 2, False, payload, T0 + i * 1000)
            for i, (topic, payload) in enumerate(SEED)]


def line(msg: StoredMessage, index: int) -> str:
    return "\t".join(["message", msg.msgid, msg.topic, str(msg.qos), output.iso_ms(msg.timestamp),
                      str(len(msg.payload)), msg.sender, PREVIEWS[index]])


@dataclass
class Backend:
    name: str
    block: str  # the backend's HOCON block
    cleanup: Callable[[], Coroutine[None, None, None]]


async def _nothing() -> None:
    return None


def _redis_backend(name: str, servers: str, redis_type: str, nodes: list[tuple[str, int]]) -> Backend:
    ns = f"oxcli{secrets.token_hex(4)}"

    async def cleanup() -> None:
        for host, port in nodes:
            client = aioredis.Redis(host=host, port=port)
            try:
                keys = [k async for k in client.scan_iter(match=f"{ns}*", count=1000)]
                for key in keys:
                    await client.delete(key)
            finally:
                await client.aclose()

    block = (f'redis {{ enable = true, servers = "{servers}", redis_type = {redis_type}, topics = ["#"], '
             f'message_ttl = 0, message_key_prefix = "{ns}:msg", subscription_key_prefix = "{ns}:sub" }}')
    return Backend(name, block, cleanup)


def _mysql_backend() -> Backend:
    database = f"oxcli_{secrets.token_hex(4)}"
    root = {"host": "127.0.0.1", "port": 3306, "user": "root", "password": "", "autocommit": True}

    async def sql(statement: str) -> None:
        conn = await aiomysql.connect(**root)
        try:
            async with conn.cursor() as cur:
                await cur.execute(statement)
        finally:
            conn.close()

    asyncio.run(sql(f"CREATE DATABASE `{database}`"))
    block = (f'mysql {{ enable = true, server = "127.0.0.1:3306", username = root, password = "", '
             f'database = "{database}", init_default_schema = true, topics = ["#"], pool_size = 2 }}')
    return Backend("mysql", block, lambda: sql(f"DROP DATABASE IF EXISTS `{database}`"))


@pytest.fixture(params=["sqlite", "redis", "redis-cluster", "mysql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        made = Backend("sqlite", f'sqlite {{ enable = true, path = "{tmp_path}/store.sqlite3", topics = ["#"] }}',
                       _nothing)
    elif request.param == "redis":
        made = _redis_backend("redis", "127.0.0.1:6379", "single", [("127.0.0.1", 6379)])
    elif request.param == "redis-cluster":
        cluster = request.getfixturevalue("redis_cluster")
        made = _redis_backend("redis-cluster", cluster.config()["servers"], "cluster",
                              [(n.host, n.port) for n in cluster.primaries()])
    else:
        made = _mysql_backend()
    try:
        yield made
    finally:
        asyncio.run(made.cleanup())


def write_config(tmp_path: Path, block: str) -> str:
    path = tmp_path / "store.hocon"
    path.write_text(f'exhook {{ listen = "127.0.0.1:{free_port()}", http {{ listen = "127.0.0.1:{free_port()}" }} }}\n'
                    f"{block}\n")
    return str(path)


async def _with_store(cfg: Config, fn: Callable[[Store], Awaitable[object]]) -> object:
    store = create_store(cfg.backend)
    await store.open()
    try:
        return await fn(store)
    finally:
        await store.close()


def seed(config: str, messages: list[StoredMessage], subs: tuple[tuple[str, str, int], ...] = ()) -> None:
    async def go(store: Store) -> None:
        await store.write([SaveMessage(m) for m in messages])
        for clientid, topic, qos in subs:
            await store.save_subscription(clientid, topic, qos)

    asyncio.run(_with_store(load_config(config), go))


def stored_ids(config: str) -> dict[str, list[str]]:
    """Every stored message id per topic, in stored order, as the store itself reads them."""

    async def go(store: Store) -> dict[str, list[str]]:
        highs = await store.latest_positions(await store.stored_topics(""))
        out: dict[str, list[str]] = {}
        async for page in store.read_messages({t: (None, h) for t, h in highs.items()}, 100):
            for msg in page:
                out.setdefault(msg.topic, []).append(msg.msgid)
        return out

    result = asyncio.run(_with_store(load_config(config), go))
    assert isinstance(result, dict)
    return result


def notes(err: str) -> list[str]:
    return [text for text in err.splitlines() if text.startswith("offline-exhook: ")]


# -- messages ------------------------------------------------------------------------------------------------------


def test_messages_lists_in_stored_order_and_counts_per_topic(
    tmp_path: Path, backend: Backend, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, backend.block)
    msgs = seed_messages()
    seed(config, msgs)

    assert run_cli(["messages", "--config", config, "--topic", "a/#"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [line(msgs[i], i) for i in (0, 1, 2, 4, 5)] + [
        "count\t2\ta/1", "count\t2\ta/2", "count\t1\ta/b/c", "total\t5\ttopics=3"]
    assert notes(err) == []

    assert run_cli(["messages", "--config", config, "--topic", "a/+", "--limit", "3"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [line(msgs[i], i) for i in (0, 1, 4)] + [
        "count\t2\ta/1", "count\t2\ta/2", "total\t4\ttopics=2"]
    assert notes(err) == ["offline-exhook: listed 3 of 4 messages (--limit 0 lists all)"]

    assert run_cli(["messages", "--config", config, "--topic", "a/1", "--count"]) == 0
    assert capsys.readouterr().out.splitlines() == ["count\t2\ta/1", "total\t2\ttopics=1"]

    assert run_cli(["messages", "--config", config, "--topic", "$share/g/a/+", "--json", "--limit", "0"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["filter"] == "a/+" and doc["total"] == 4 and doc["topics"] == {"a/1": 2, "a/2": 2}
    assert [m["msgid"] for m in doc["messages"]] == [msgs[i].msgid for i in (0, 1, 4, 5)]
    assert [base64.b64decode(m["payload_base64"]) for m in doc["messages"]] == [SEED[i][1] for i in (0, 1, 4, 5)]
    first = doc["messages"][0]
    assert (first["topic"], first["qos"], first["timestamp"], first["from"], first["size"]) == (
        "a/1", 1, T0, "pub0", 5)

    assert run_cli(["messages", "--config", config, "--topic", "nothing/here/#"]) == 0
    out, err = capsys.readouterr()
    assert out == "total\t0\ttopics=0\n"
    assert stored_ids(config)["a/1"] == [msgs[0].msgid, msgs[4].msgid]  # reading deleted nothing


def test_subscriptions_of_a_client(tmp_path: Path, backend: Backend, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, backend.block)
    seed(config, [], (("c1", "b/#", 2), ("c1", "a/1", 1), ("c2", "x", 0)))
    assert run_cli(["subscriptions", "--config", config, "c1"]) == 0
    assert capsys.readouterr().out.splitlines() == ["subscription\tc1\ta/1\t1", "subscription\tc1\tb/#\t2"]
    assert run_cli(["subscriptions", "c2", "--json", "--config", config]) == 0
    assert json.loads(capsys.readouterr().out) == {"clientid": "c2", "subscriptions": [{"topic": "x", "qos": 0}]}
    assert run_cli(["subscriptions", "--config", config, "nobody"]) == 0
    out, err = capsys.readouterr()
    assert out == "" and notes(err) == ["offline-exhook: no stored subscriptions for client 'nobody'"]


# -- purge ---------------------------------------------------------------------------------------------------------


def test_purge_is_a_dry_run_without_yes_and_deletes_exactly_the_filter_with_it(
    tmp_path: Path, backend: Backend, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_config(tmp_path, backend.block)
    msgs = seed_messages()
    seed(config, msgs)

    assert run_cli(["purge", "--config", config, "--topic", "a/#"]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines() == ["count\t2\ta/1", "count\t2\ta/2", "count\t1\ta/b/c", "total\t5\ttopics=3"]
    assert notes(err) == ["offline-exhook: dry run, nothing deleted: run again with --yes to delete these "
                          "5 message(s) in 3 topic(s)"]
    assert sum(len(ids) for ids in stored_ids(config).values()) == 6

    # small pages and a progress line every 2 messages, to see the progress of a long purge
    monkeypatch.setattr(stored, "READ_PAGE", 2)
    monkeypatch.setattr(output, "PROGRESS_EVERY", 2)
    assert run_cli(["purge", "--config", config, "--topic", "a/#", "--yes"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == ["deleted\t2\ta/1", "deleted\t2\ta/2", "deleted\t1\ta/b/c", "total\t5\ttopics=3"]
    assert notes(err) == [
        "offline-exhook: purge: 2 of 5 messages deleted",
        "offline-exhook: purge: topic 1 of 3 done, 2 deleted: a/1",
        "offline-exhook: purge: 4 of 5 messages deleted",
        "offline-exhook: purge: topic 2 of 3 done, 2 deleted: a/2",
        "offline-exhook: purge: topic 3 of 3 done, 1 deleted: a/b/c",
    ]
    assert stored_ids(config) == {"other/x": [msgs[3].msgid]}

    # nothing left to purge: not a dry run to confirm
    assert run_cli(["purge", "--config", config, "--topic", "a/#"]) == 0
    assert capsys.readouterr().out == "total\t0\ttopics=0\n"
    assert run_cli(["purge", "--config", config, "--topic", "other/x", "--yes", "--json", "-q"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == {"filter": "other/x", "dry_run": False, "total": 1, "topics": {"other/x": 1},
                               "deleted": 1}
    assert notes(err) == []
    assert stored_ids(config) == {}


# -- Redis specifics -------------------------------------------------------------------------------------------------


def test_rebuild_topic_index_makes_plugin_topics_visible_to_wildcards(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    backend = _redis_backend("redis", "127.0.0.1:6379", "single", [("127.0.0.1", 6379)])
    try:
        config = write_config(tmp_path, backend.block)
        seed(config, seed_messages())
        cfg = load_config(config)
        assert isinstance(cfg.backend, RedisConfig)
        prefix = cfg.backend.message_key_prefix

        async def forget_index() -> None:  # a store written by the Erlang plugin has no topic index
            client = aioredis.Redis(host="127.0.0.1", port=6379)
            assert await client.delete(f"{prefix}~ox:topics") == 1
            await client.aclose()

        asyncio.run(forget_index())
        assert run_cli(["messages", "--config", config, "--topic", "a/#", "--count"]) == 0
        out, err = capsys.readouterr()
        assert out == "total\t0\ttopics=0\n"
        assert notes(err) == ["offline-exhook: no topic matches; if the Erlang plugin wrote this store, "
                              "run rebuild-topic-index once"]
        assert run_cli(["messages", "--config", config, "--topic", "a/1", "--count"]) == 0  # exact: no index needed
        assert capsys.readouterr().out.splitlines() == ["count\t2\ta/1", "total\t2\ttopics=1"]

        assert run_cli(["rebuild-topic-index", "--config", config]) == 0
        assert capsys.readouterr().out == "offline-exhook: indexed 4 topic(s) with stored messages\n"
        assert run_cli(["messages", "--config", config, "--topic", "a/#", "--count"]) == 0
        assert capsys.readouterr().out.splitlines()[-1] == "total\t5\ttopics=3"
    finally:
        asyncio.run(backend.cleanup())


def test_counting_works_for_a_redis_user_without_zcount(
    tmp_path: Path, redis_factory: RedisTopologies, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch
) -> None:
    ranged: list[bytes] = []
    real = Reader.count_by_range

    async def count_by_range(self: Reader, key: bytes, live_min: bytes) -> int:
        ranged.append(key)
        return await real(self, key, live_min)

    monkeypatch.setattr(Reader, "count_by_range", count_by_range)
    ns = "oxacl"
    rules = (f"resetkeys ~{ns}:msg:* ~{ns}:msg~ox:* ~{ns}:sub:* resetchannels -@all "
             + " ".join(f"+{c.lower()}" for c in REDIS_COMMANDS))  # the service's commands: no ZCOUNT
    password = secrets.token_hex(8)
    topology = redis_factory.single(users=[AclUser("ox", password, rules)])
    block = (f'redis {{ enable = true, servers = "{topology.config()["servers"]}", username = ox, '
             f'password = "{password}", topics = ["#"], message_key_prefix = "{ns}:msg", '
             f'subscription_key_prefix = "{ns}:sub" }}')
    config = write_config(tmp_path, block)
    seed(config, seed_messages())
    assert run_cli(["purge", "--config", config, "--topic", "a/+"]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines() == ["count\t2\ta/1", "count\t2\ta/2", "total\t4\ttopics=2"]
    assert password not in out + err
    assert ranged == [f"{ns}:msg:a/1".encode(), f"{ns}:msg:a/2".encode()]  # ZCOUNT was refused: paged ZRANGE


# -- errors ----------------------------------------------------------------------------------------------------------


def test_bad_filters_missing_databases_and_unreachable_stores_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sqlite = write_config(tmp_path, f'sqlite {{ enable = true, path = "{tmp_path}/none.sqlite3", topics = ["#"] }}')
    assert run_cli(["messages", "--config", sqlite, "--topic", "a/#/b"]) == 2
    assert capsys.readouterr().err == "offline-exhook: --topic: topic filter 'a/#/b': '#' must be a whole, last level\n"
    assert run_cli(["purge", "--config", sqlite, "--topic", "a/#", "--yes"]) == 2
    assert capsys.readouterr().err == f"offline-exhook: sqlite.path: no database at {tmp_path}/none.sqlite3\n"
    assert not (tmp_path / "none.sqlite3").exists()  # and none was created
    assert run_cli(["rebuild-topic-index", "--config", sqlite]) == 2
    assert capsys.readouterr().err == "offline-exhook: rebuild-topic-index applies to the redis backend only\n"

    down = write_config(tmp_path, f'redis {{ enable = true, servers = "127.0.0.1:{free_port()}", topics = ["#"] }}')
    assert run_cli(["subscriptions", "--config", down, "c1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("offline-exhook: redis (single 127.0.0.1:") and "cannot connect" in err
    assert err.count("\n") == 1


def test_messages_as_a_subprocess(tmp_path: Path) -> None:
    config = write_config(tmp_path, f'sqlite {{ enable = true, path = "{tmp_path}/s.sqlite3", topics = ["#"] }}')
    msgs = seed_messages()
    seed(config, msgs)
    proc = subprocess.run([sys.executable, "-m", "exhook", "messages", "--config", config, "--topic", "+/x"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [line(msgs[3], 3), "count\t1\tother/x", "total\t1\ttopics=1"]
