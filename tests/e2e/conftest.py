from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.e2e.backends import make_backend
from tests.e2e.harness import Harness

BACKENDS = ["redis", "redis-sentinel", "redis-cluster", "mysql", "sqlite"]
TOPOLOGY_FIXTURES = {"redis-sentinel": "redis_sentinel", "redis-cluster": "redis_cluster"}


@pytest.fixture(params=BACKENDS)
def backend_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=["v3", "v2"])
def version(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def make_harness(backend_name: str, version: str, tmp_path: Path,
                       request: pytest.FixtureRequest) -> AsyncIterator[object]:
    made: list[Harness] = []
    fixture = TOPOLOGY_FIXTURES.get(backend_name)
    topology = request.getfixturevalue(fixture) if fixture else None

    async def make(**kwargs: object) -> Harness:
        backend = make_backend(backend_name, tmp_path, topology)
        h = Harness(backend, version, **kwargs)  # type: ignore[arg-type]
        made.append(h)
        await h.start()
        return h

    yield make
    for h in made:
        await h.stop()
    for h in made:
        assert h.emu is None or not h.emu.errors, h.emu.errors


@pytest.fixture
async def h(make_harness) -> Harness:  # type: ignore[no-untyped-def]
    return await make_harness()
