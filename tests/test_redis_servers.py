"""The Redis test topologies (tests/redis_servers.py + tests/redis_fixtures.py) against plain redis-py."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import redis.asyncio as aredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import (
    AuthenticationError,
    ConnectionError,
    NoPermissionError,
    RedisClusterException,
    ResponseError,
)

from exhook.config import HostPort, RedisConfig, load_config_string
from tests.redis_servers import (
    HOST,
    MARKER,
    AclUser,
    RedisClusterSet,
    RedisSentinelSet,
    RedisSingle,
    RedisTopologyError,
    TlsMaterial,
    pid_running,
    tls_client_kwargs,
    to_hocon,
)

if TYPE_CHECKING:
    from tests.redis_fixtures import RedisTopologies

pytest_plugins = ["tests.redis_fixtures"]

ROOT = Path(__file__).resolve().parent.parent


def _no_retry() -> Retry:
    """redis-py retries connection errors with exponential backoff by default (seconds per refusal)."""
    return Retry(NoBackoff(), 0)


def _pgrep(pattern: str) -> set[int]:
    result = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True, check=False)
    return {int(pid) for pid in result.stdout.split()}


def _parse(cfg: dict[str, object]) -> RedisConfig:
    backend = load_config_string(to_hocon(cfg)).backend
    assert isinstance(backend, RedisConfig)
    return backend


# ---------------------------------------------------------------------------
# TLS material
# ---------------------------------------------------------------------------


def test_tls_material_chains(redis_tls: TlsMaterial) -> None:
    def verify(ca: Path, cert: Path) -> bool:
        return subprocess.run(["openssl", "verify", "-CAfile", str(ca), str(cert)],
                              capture_output=True, check=False).returncode == 0

    assert verify(redis_tls.ca_cert, redis_tls.server_cert)
    assert verify(redis_tls.ca_cert, redis_tls.client_cert)
    assert verify(redis_tls.other_ca_cert, redis_tls.other_client_cert)
    assert not verify(redis_tls.other_ca_cert, redis_tls.server_cert)
    assert not verify(redis_tls.ca_cert, redis_tls.other_client_cert)
    text = subprocess.run(["openssl", "x509", "-noout", "-text", "-in", str(redis_tls.server_cert)],
                          capture_output=True, text=True, check=True).stdout
    assert "IP Address:127.0.0.1" in text and "DNS:localhost" in text


# ---------------------------------------------------------------------------
# single
# ---------------------------------------------------------------------------


async def test_single_plain_and_config(redis_single_clean: RedisSingle) -> None:
    single = redis_single_clean
    client = aredis.Redis(host=HOST, port=single.port)
    try:
        await client.set("mqtt:msg:1", b"payload")
        assert await client.get("mqtt:msg:1") == b"payload"
    finally:
        await client.aclose()

    cfg = single.config(pool_size=4)
    assert cfg["servers"] == f"{HOST}:{single.port}" and cfg["redis_type"] == "single"
    assert cfg["ssl"]["enable"] is False
    parsed = _parse(cfg)
    assert parsed.servers == (HostPort(HOST, single.port),)
    assert parsed.redis_type == "single" and parsed.pool_size == 4 and not parsed.ssl.enable


async def test_single_tls_verify_on_works(redis_single_tls: RedisSingle, redis_tls: TlsMaterial) -> None:
    single = redis_single_tls
    client = aredis.Redis(host=HOST, port=single.port, **tls_client_kwargs(redis_tls))
    try:
        assert await client.ping()
        await client.set("mqtt:tls", "1")
        assert await client.get("mqtt:tls") == b"1"
    finally:
        await client.aclose()
    parsed = _parse(single.config())
    assert parsed.ssl.enable and parsed.ssl.verify
    assert parsed.ssl.cacertfile == str(redis_tls.ca_cert)
    assert parsed.ssl.certfile == str(redis_tls.client_cert) and parsed.ssl.keyfile == str(redis_tls.client_key)
    assert single.config(ssl={"cacertfile": str(redis_tls.other_ca_cert)})["ssl"]["certfile"] == str(
        redis_tls.client_cert
    )


async def test_single_tls_refusals(redis_single_tls: RedisSingle, redis_tls: TlsMaterial) -> None:
    port = redis_single_tls.port

    async def ping(**kwargs: Any) -> None:
        client = aredis.Redis(host=HOST, port=port, socket_timeout=3, socket_connect_timeout=3,
                              retry=_no_retry(), **kwargs)
        try:
            await client.ping()
        finally:
            await client.aclose()

    # the server's certificate does not chain to the unrelated CA
    with pytest.raises(ConnectionError, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
        await ping(**tls_client_kwargs(redis_tls, ca=redis_tls.other_ca_cert))
    # client certificate from the unrelated CA / no client certificate: refused by the server
    foreign = {**tls_client_kwargs(redis_tls), "ssl_certfile": str(redis_tls.other_client_cert),
               "ssl_keyfile": str(redis_tls.other_client_key)}
    with pytest.raises(ConnectionError):
        await ping(**foreign)
    with pytest.raises(ConnectionError):
        await ping(**tls_client_kwargs(redis_tls, client_cert=False))
    # plaintext on the TLS port
    with pytest.raises(ConnectionError):
        await ping()


@pytest.mark.parametrize("aclfile", [False, True], ids=["user-directives", "aclfile"])
async def test_single_acl_user(redis_factory: RedisTopologies, aclfile: bool) -> None:
    app = AclUser("app", "app-secret", "~mqtt:* resetchannels -@all +ping +get +set +del +exists")
    single = redis_factory.single(requirepass="default-secret", users=[app], aclfile=aclfile)
    cfg = single.config(user="app")
    assert (cfg["username"], cfg["password"]) == ("app", "app-secret")
    assert _parse(cfg).username == "app"

    client = aredis.Redis(host=HOST, port=single.port, username=cfg["username"], password=cfg["password"])
    default = aredis.Redis(host=HOST, port=single.port, password=single.config()["password"])
    anonymous = aredis.Redis(host=HOST, port=single.port, retry=_no_retry())
    try:
        assert await client.set("mqtt:msg:1", "x")
        assert await client.get("mqtt:msg:1") == b"x"
        with pytest.raises(NoPermissionError):  # key outside ~mqtt:*
            await client.set("other:1", "x")
        with pytest.raises(NoPermissionError):  # command not granted
            await client.hset("mqtt:hash", "f", "v")
        with pytest.raises(NoPermissionError):
            await client.flushall()
        assert await default.get("mqtt:msg:1") == b"x"  # requirepass = the default user's password
        with pytest.raises((AuthenticationError, ResponseError)):
            await anonymous.get("mqtt:msg:1")
        with single.admin_client() as admin:
            acl = admin.acl_list()
            assert any(line.startswith("user app on") for line in acl)
            assert bool(admin.config_get("aclfile")["aclfile"]) is aclfile
    finally:
        for conn in (client, default, anonymous):
            await conn.aclose()


# ---------------------------------------------------------------------------
# sentinel
# ---------------------------------------------------------------------------


async def _close_sentinel(sentinel: Sentinel) -> None:
    for conn in sentinel.sentinels:
        await conn.aclose()


async def test_sentinel_failover(redis_factory: RedisTopologies) -> None:
    name = "exhook-failover"
    sset = redis_factory.sentinel(name)
    assert sset.started_in is not None and sset.started_in < 10
    cfg = sset.config()
    assert cfg["redis_type"] == "sentinel" and cfg["sentinel"] == name
    parsed = _parse(cfg)
    assert [hp.port for hp in parsed.servers] == [port for _, port in sset.sentinel_addresses()]

    sentinel = Sentinel(sset.sentinel_addresses(), socket_timeout=1.0)
    master = sentinel.master_for(name, socket_timeout=1.0)
    try:
        await master.set("mqtt:before", "1")
        assert await master.wait(1, 2000) == 1  # the replica has it
        old = sset.kill_master()
        assert not pid_running(sset.node_by_port(old[1]).pid)
        t0 = time.monotonic()
        new = await sset.wait_failover(30)
        failover_s = time.monotonic() - t0
        assert new != old and failover_s < 30
        assert await sentinel.discover_master(name) == new

        fresh = sentinel.master_for(name, socket_timeout=1.0)
        try:
            await fresh.set("mqtt:after", "2")
            assert await fresh.get("mqtt:before") == b"1"
        finally:
            await fresh.aclose()
        # the client created before the failover finds the new master as well
        for attempt in range(20):
            try:
                await master.set("mqtt:after-old-client", "3")
                break
            except (ConnectionError, TimeoutError):
                if attempt == 19:
                    raise
                await asyncio.sleep(0.1)

        await asyncio.to_thread(sset.restart_killed)  # old master back, as a replica
        # healthy again: one master, one replica, both nodes alive (on a loaded machine the
        # sentinels may already have failed over once more, so which is which is not fixed)
        master_now = sset.master_address()
        replica_ports = [n.port for n in sset.replicas()]
        assert len(replica_ports) == 1 and master_now[1] not in replica_ports
        assert {master_now[1], *replica_ports} == {old[1], new[1]}
    finally:
        await master.aclose()
        await _close_sentinel(sentinel)


async def test_sentinel_shared_fixture(redis_sentinel_clean: RedisSentinelSet) -> None:
    sset = redis_sentinel_clean
    sentinel = Sentinel(sset.sentinel_addresses(), socket_timeout=1.0)
    master = sentinel.master_for("mymaster", socket_timeout=1.0)
    replica = sentinel.slave_for("mymaster", socket_timeout=1.0)
    try:
        assert await master.dbsize() == 0
        await master.set("mqtt:x", "1")
        await master.wait(1, 2000)
        assert await replica.get("mqtt:x") == b"1"
    finally:
        await master.aclose()
        await replica.aclose()
        await _close_sentinel(sentinel)


async def test_sentinel_tls(redis_sentinel_tls: RedisSentinelSet, redis_tls: TlsMaterial) -> None:
    sset = redis_sentinel_tls
    cfg = sset.config()
    assert cfg["ssl"]["enable"] and _parse(cfg).ssl.cacertfile == str(redis_tls.ca_cert)
    tls = tls_client_kwargs(redis_tls)
    sentinel = Sentinel(sset.sentinel_addresses(), sentinel_kwargs={**tls, "socket_timeout": 2.0},
                        socket_timeout=2.0, **tls)
    master = sentinel.master_for("mymaster")
    try:
        await master.set("mqtt:tls", "1")
        assert await master.get("mqtt:tls") == b"1"
        assert await master.wait(1, 2000) == 1  # replication over TLS
    finally:
        await master.aclose()
        await _close_sentinel(sentinel)
    wrong = Sentinel(sset.sentinel_addresses(),
                     sentinel_kwargs={**tls_client_kwargs(redis_tls, ca=redis_tls.other_ca_cert),
                                      "socket_timeout": 2.0, "retry": _no_retry()})
    try:
        with pytest.raises(MasterNotFoundError):  # every sentinel refused: certificate not trusted
            await wrong.discover_master("mymaster")
    finally:
        await _close_sentinel(wrong)


# ---------------------------------------------------------------------------
# cluster
# ---------------------------------------------------------------------------


async def test_cluster_writes_across_slots(redis_cluster_clean: RedisClusterSet) -> None:
    cluster = redis_cluster_clean
    assert cluster.started_in is not None and cluster.started_in < 10
    primaries = cluster.primaries()
    assert len(primaries) == 3 and len(cluster.replicas()) == 3
    assert sum(p.slot_count() for p in primaries) == 16384
    parsed = _parse(cluster.config())
    assert parsed.redis_type == "cluster" and len(parsed.servers) == 6

    keys = [f"mqtt:msg:{i}" for i in range(3000)]
    assert len({key_slot(k.encode()) for k in keys}) > 2000
    client = RedisCluster(host=HOST, port=cluster.nodes[0].port)
    try:
        async with client.pipeline() as pipe:
            for key in keys:
                pipe.set(key, key)
            await pipe.execute()
        assert await client.mget_nonatomic(keys) == [k.encode() for k in keys]
    finally:
        await client.aclose()
    sizes = []
    for primary in primaries:
        with cluster.node_by_port(primary.port).client() as admin:
            sizes.append(admin.dbsize())
    assert all(size > 0 for size in sizes) and sum(sizes) == len(keys)


async def test_cluster_reshard_under_load(redis_cluster_clean: RedisClusterSet) -> None:
    cluster = redis_cluster_clean
    source, target = cluster.primaries()[:2]
    client = RedisCluster(host=HOST, port=cluster.nodes[0].port)
    written: list[str] = []
    stop = asyncio.Event()

    async def writer(worker: int) -> None:
        # a client of its own: redis-py's async cluster client drops the connections of a
        # node when a MOVED makes it reload the slots, even one another task of the same
        # client is using (seen once: AttributeError on a connection whose writer was gone)
        own = RedisCluster(host=HOST, port=cluster.nodes[0].port)
        try:
            i = 0
            while not stop.is_set():
                key = f"mqtt:load:{worker}:{i}"
                await own.set(key, key)
                written.append(key)
                i += 1
        finally:
            await own.aclose()

    try:
        async with client.pipeline() as pipe:  # keys to migrate
            for i in range(3000):
                pipe.set(f"mqtt:pre:{i}", f"mqtt:pre:{i}")
                written.append(f"mqtt:pre:{i}")
            await pipe.execute()
        tasks = [asyncio.create_task(writer(w)) for w in range(4)]
        await asyncio.sleep(0.1)
        before = len(written)
        output = await cluster.reshard(1000, source, target)
        during = len(written) - before
        stop.set()
        await asyncio.gather(*tasks)
        assert during > 100, "the load did not run while resharding"
        assert "Moving slot" in output

        after = {p.node_id: p.slot_count() for p in cluster.primaries()}
        assert after[source.node_id] == source.slot_count() - 1000
        assert after[target.node_id] == target.slot_count() + 1000
        values = await client.mget_nonatomic(written)
        missing = [k for k, v in zip(written, values, strict=True) if v != k.encode()]
        assert not missing, f"{len(missing)} keys lost, e.g. {missing[:5]}"
    finally:
        stop.set()
        await client.aclose()
    total = 0
    for primary in cluster.primaries():
        with cluster.node_by_port(primary.port).client() as admin:
            total += admin.dbsize()
    assert total == len(written)


async def test_cluster_tls(redis_cluster_tls: RedisClusterSet, redis_tls: TlsMaterial) -> None:
    cluster = redis_cluster_tls
    parsed = _parse(cluster.config())
    assert parsed.ssl.enable and len(parsed.servers) == 6
    client = RedisCluster(host=HOST, port=cluster.nodes[0].port, **tls_client_kwargs(redis_tls))
    keys = [f"mqtt:tls:{i}" for i in range(500)]
    try:
        for key in keys:
            await client.set(key, key)
        assert await client.mget_nonatomic(keys) == [k.encode() for k in keys]
    finally:
        await client.aclose()
    wrong = RedisCluster(host=HOST, port=cluster.nodes[0].port,
                         retry=_no_retry(), **tls_client_kwargs(redis_tls, ca=redis_tls.other_ca_cert))
    with pytest.raises(RedisClusterException, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
        await wrong.initialize()
    await wrong.aclose()


# ---------------------------------------------------------------------------
# cleanup
# ---------------------------------------------------------------------------


def test_stop_kills_every_process_even_on_error(redis_tls: TlsMaterial) -> None:
    pids: list[int] = []
    with pytest.raises(RuntimeError, match="boom"), RedisSentinelSet("cleanup", tls=redis_tls) as sset:
        pids = sset.pids()
        assert len(pids) == 5 and all(pid_running(p) for p in pids)
        assert set(pids) <= _pgrep(MARKER)
        raise RuntimeError("boom")
    assert pids and not any(pid_running(p) for p in pids)
    assert not set(pids) & _pgrep(MARKER)


def test_stop_escalates_to_sigkill() -> None:
    single = RedisSingle().start()
    pid = single.pid
    try:
        os.kill(pid, signal.SIGSTOP)  # a stopped process does not act on SIGTERM
        t0 = time.monotonic()
        single.stop(timeout=0.5)
        assert time.monotonic() - t0 >= 0.5
    finally:
        single.stop()
    assert not pid_running(pid)


def test_failed_start_leaves_nothing() -> None:
    broken = RedisSingle(extra_conf=["no-such-directive yes"])
    with pytest.raises(RedisTopologyError, match="no-such-directive"):
        broken.start()
    assert broken.pids() and not any(pid_running(p) for p in broken.pids())


def test_fixture_teardown_after_failing_test(tmp_path: Path) -> None:
    """A pytest run whose test fails, using session, module and function scoped topologies:
    afterwards no process with that run's marker exists."""
    token = f"inner{os.getpid()}x{time.monotonic_ns() % 10**9}"
    pid_file = tmp_path / "pids.txt"
    test_file = tmp_path / "test_inner.py"
    test_file.write_text(textwrap.dedent(f"""
        from pathlib import Path

        def test_fails(redis_single, redis_sentinel, redis_cluster, redis_factory):
            extra = redis_factory.single()
            pids = [*redis_single.pids(), *redis_sentinel.pids(), *redis_cluster.pids(), *extra.pids()]
            Path({str(pid_file)!r}).write_text(" ".join(map(str, pids)))
            assert False, "deliberate failure"
    """))
    env = {**os.environ, "EXHOOK_REDIS_RUN_TOKEN": token, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.redis_fixtures", "-p", "no:cacheprovider",
         "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(ROOT), str(test_file)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=90, check=False,
    )
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-2000:]
    assert "deliberate failure" in result.stdout
    pids = [int(p) for p in pid_file.read_text().split()]
    assert len(pids) == 1 + 5 + 6 + 1
    assert not any(pid_running(p) for p in pids)
    assert not _pgrep(f"exhook-redis-{token}")


def test_servers_die_with_a_killed_test_process() -> None:
    """Even a SIGKILLed test process (no teardown, no atexit) leaves no server behind."""
    script = (
        "import sys, time\n"
        "from tests.redis_servers import RedisSingle\n"
        "single = RedisSingle().start()\n"
        "print(single.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout is not None
        pid = int(proc.stdout.readline())
        assert pid_running(pid)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 5
    while pid_running(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not pid_running(pid)
