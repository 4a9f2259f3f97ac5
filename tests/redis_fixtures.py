"""pytest fixtures starting real Redis topologies (see ``tests/redis_servers.py``).

Register once, in a conftest (it must be a conftest pytest loads at startup, e.g. ``tests/conftest.py``)::

    pytest_plugins = ["tests.redis_fixtures"]

(A test module may also declare that line itself; the plugin is registered once either way.)

Fixtures (all servers bind 127.0.0.1 on free ports; everything is stopped at teardown, also after failures):

=========================  ========  ==========================================================
``redis_tls``              session   ``TlsMaterial``: CA, server/client certs, an unrelated CA
``redis_factory``          function  ``RedisTopologies``: ``.single()`` / ``.sentinel()`` / ``.cluster()``
                                     for custom or destructive setups, stopped after the test
``redis_module_factory``   module    the same, stopped after the module
``redis_session_factory``  session   the same, stopped at the end of the session
``redis_single``           session   plain ``RedisSingle`` (no auth, no TLS)
``redis_single_tls``       session   ``RedisSingle`` with TLS, client certificate required
``redis_sentinel``         module    ``RedisSentinelSet`` (master name ``mymaster``)
``redis_sentinel_tls``     module    the same with TLS everywhere
``redis_cluster``          session   ``RedisClusterSet`` (3 primaries + 3 replicas)
``redis_cluster_tls``      session   the same with ``tls-cluster`` / ``tls-replication``
``redis_single_clean``     function  ``redis_single`` after FLUSHALL
``redis_sentinel_clean``   function  ``redis_sentinel`` healed (killed nodes restarted) + FLUSHALL
``redis_cluster_clean``    function  ``redis_cluster`` stable + FLUSHALL on every primary
=========================  ========  ==========================================================

Shared (module/session) topologies: don't kill nodes of ``redis_cluster``; killing the master of
``redis_sentinel`` is fine when later tests use ``redis_sentinel_clean`` (it restarts the killed node), but a
fresh ``redis_factory.sentinel()`` is the cleaner choice for failover tests.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.redis_servers import (
    RedisClusterSet,
    RedisSentinelSet,
    RedisSingle,
    TlsMaterial,
    make_tls_material,
)

__all__ = [
    "RedisTopologies",
    "redis_cluster",
    "redis_cluster_clean",
    "redis_cluster_tls",
    "redis_factory",
    "redis_module_factory",
    "redis_sentinel",
    "redis_sentinel_clean",
    "redis_sentinel_tls",
    "redis_session_factory",
    "redis_single",
    "redis_single_clean",
    "redis_single_tls",
    "redis_tls",
]


class RedisTopologies:
    """Starts topologies and remembers them; ``stop_all()`` stops every one (newest first)."""

    def __init__(self) -> None:
        self.started: list[RedisSingle | RedisSentinelSet | RedisClusterSet] = []

    def single(self, **kwargs: Any) -> RedisSingle:
        """``RedisSingle(**kwargs).start()`` (tls=, tls_auth_clients=, requirepass=, users=, aclfile=, ...)."""
        topology = RedisSingle(**kwargs)
        self.started.append(topology)
        return topology.start()

    def sentinel(self, master_name: str = "mymaster", **kwargs: Any) -> RedisSentinelSet:
        """``RedisSentinelSet(master_name, **kwargs).start()``."""
        topology = RedisSentinelSet(master_name, **kwargs)
        self.started.append(topology)
        return topology.start()

    def cluster(self, **kwargs: Any) -> RedisClusterSet:
        """``RedisClusterSet(**kwargs).start()``."""
        topology = RedisClusterSet(**kwargs)
        self.started.append(topology)
        return topology.start()

    def stop_all(self) -> None:
        errors: list[BaseException] = []
        while self.started:
            topology = self.started.pop()
            try:
                topology.stop()
            except BaseException as exc:  # keep stopping the others
                errors.append(exc)
        if errors:
            raise errors[0]


@pytest.fixture(scope="session")
def redis_tls(tmp_path_factory: pytest.TempPathFactory) -> TlsMaterial:
    return make_tls_material(Path(tmp_path_factory.mktemp("redis-tls")))


def _owned_topologies() -> Iterator[RedisTopologies]:
    """Topologies started through the fixture, all stopped when its scope ends."""
    topologies = RedisTopologies()
    try:
        yield topologies
    finally:
        topologies.stop_all()


@pytest.fixture
def redis_factory() -> Iterator[RedisTopologies]:
    yield from _owned_topologies()


@pytest.fixture(scope="module")
def redis_module_factory() -> Iterator[RedisTopologies]:
    yield from _owned_topologies()


@pytest.fixture(scope="session")
def redis_session_factory() -> Iterator[RedisTopologies]:
    yield from _owned_topologies()


@pytest.fixture(scope="session")
def redis_single(redis_session_factory: RedisTopologies) -> RedisSingle:
    return redis_session_factory.single()


@pytest.fixture(scope="session")
def redis_single_tls(redis_session_factory: RedisTopologies, redis_tls: TlsMaterial) -> RedisSingle:
    return redis_session_factory.single(tls=redis_tls)


@pytest.fixture(scope="module")
def redis_sentinel(redis_module_factory: RedisTopologies) -> RedisSentinelSet:
    return redis_module_factory.sentinel("mymaster")


@pytest.fixture(scope="module")
def redis_sentinel_tls(redis_module_factory: RedisTopologies, redis_tls: TlsMaterial) -> RedisSentinelSet:
    return redis_module_factory.sentinel("mymaster", tls=redis_tls)


@pytest.fixture(scope="session")
def redis_cluster(redis_session_factory: RedisTopologies) -> RedisClusterSet:
    return redis_session_factory.cluster()


@pytest.fixture(scope="session")
def redis_cluster_tls(redis_session_factory: RedisTopologies, redis_tls: TlsMaterial) -> RedisClusterSet:
    return redis_session_factory.cluster(tls=redis_tls)


@pytest.fixture
def redis_single_clean(redis_single: RedisSingle) -> RedisSingle:
    redis_single.flush()
    return redis_single


@pytest.fixture
def redis_sentinel_clean(redis_sentinel: RedisSentinelSet) -> RedisSentinelSet:
    if redis_sentinel.has_dead_nodes():
        redis_sentinel.restart_killed()
    redis_sentinel.flush()
    return redis_sentinel


@pytest.fixture
def redis_cluster_clean(redis_cluster: RedisClusterSet) -> RedisClusterSet:
    redis_cluster.wait_stable()
    redis_cluster.flush()
    return redis_cluster
