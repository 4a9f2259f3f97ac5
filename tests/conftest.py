# Real Redis topologies (sentinel, cluster, TLS, ACL) started by fixtures on loopback ports;
# a database of its own per MySQL test module.
pytest_plugins = ["tests.redis_fixtures", "tests.mysql_fixtures"]

from collections.abc import Iterator  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _own_working_directory(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test runs in a directory of its own: relative paths of a config (the
    default spool ``data/spool.sqlite3``, the default SQLite store) never reach the
    checkout nor another test."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
    yield
