"""docs/operate.md's troubleshooting section, reproduced: each symptom is caused on
purpose and what the docs say the operator sees (``/readyz``, metrics, log lines,
gRPC health) is asserted against the running service, with the same words."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import pytest

from exhook.health import Readiness
from tests.e2e.backends import SqliteBackend
from tests.e2e.harness import Harness, free_port
from tests.e2e.test_health import GRPC_NAMES, NOT_SERVING, SERVING, eventually, grpc_status, http_get
from tests.e2e.test_metrics import Samples, scrape
from tests.e2e.test_outages import PrivateRedisBackend, RedisProcess, redis_process
from tests.emulator import EmqxEmulator

__all__ = ["redis_process"]  # a fixture used here

DOC = Path(__file__).resolve().parents[2] / "docs" / "operate.md"


def documented(*snippets: str) -> None:
    """Every snippet is what the troubleshooting section tells the operator to look for."""
    section = DOC.read_text().split("## Troubleshooting", 1)[1]
    text = " ".join(section.split())  # markdown wraps lines anywhere
    for snippet in snippets:
        assert snippet in text, f"docs/operate.md does not say {snippet!r}"


def sample(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), float("nan"))


def lines(caplog: pytest.LogCaptureFixture, level: int = logging.WARNING) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= level]


async def readyz(h: Harness, query: str = "") -> tuple[int, str]:
    status, body = await http_get(h.service, "/readyz" + query)
    return status, body.get("reason", "")


async def wait_reason(h: Harness, text: str) -> str:
    async def shown() -> bool:
        return text in (await readyz(h))[1]
    await eventually(shown)
    return (await readyz(h))[1]


async def test_store_down(redis_process: RedisProcess, caplog: pytest.LogCaptureFixture) -> None:
    redis_process.start()
    h = Harness(PrivateRedisBackend(redis_process.port), "v3")
    await h.start()
    try:
        redis_process.kill()
        reason = await wait_reason(h, "store: redis unreachable: ")
        documented("reason `store: redis unreachable: ConnectionError: ...`", "gRPC health `NOT_SERVING`",
                   "`offline_exhook_backend_up 0`", "`not ready: store: redis unreachable: ...`")
        assert reason.startswith("store: redis unreachable: ") and "ConnectionError" in reason
        assert [await grpc_status(h, name) for name in GRPC_NAMES] == [NOT_SERVING] * len(GRPC_NAMES)
        assert sample(await scrape(h), "offline_exhook_backend_up") == 0
        assert any(line.startswith("not ready: store: redis unreachable: ") for line in lines(caplog))
        # the fix: bring it back; nothing to do on the service
        redis_process.start()

        async def ready() -> bool:
            return (await readyz(h))[0] == 200
        await eventually(ready)
    finally:
        await h.stop()


@pytest.mark.parametrize(
    ("setting", "status", "reason"),
    [
        ({"extra_hocon": 'exhook.emqx.api_secret = "not-the-secret"'}, "401",
         "emqx_api: 401 unauthorized (check exhook.emqx.api_key / api_secret)"),
        ({"api_role": "publisher"}, "403", "emqx_api: 403 forbidden (the API key needs the administrator role)"),
    ],
)
async def test_emqx_refuses_the_api_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, setting: dict[str, str], status: str, reason: str
) -> None:
    h = Harness(SqliteBackend(tmp_path), "v3", **setting)  # type: ignore[arg-type]
    await h.start()
    try:
        documented(f"reason `{reason}`", "`offline_exhook_emqx_api_up 0`", f'status="{status}"',
                   "gRPC health stays `SERVING`", "`offline_exhook_replay_failures_total`")
        assert await wait_reason(h, reason) == reason  # once the emulated EMQX is up (started after the service)
        assert await readyz(h, "?exclude=emqx_api") == (200, "")
        # EMQX keeps calling: the store is fine, only the REST API is refused
        assert await grpc_status(h, "") == SERVING
        pub = h.client("ts-pub")
        await pub.connect()
        await pub.publish("t/ts", b"kept", qos=1)
        sub = h.client("ts-sub")
        await sub.connect()
        await sub.subscribe("t/ts", qos=1)
        await h.settle()
        metrics = await scrape(h)
        assert sample(metrics, "offline_exhook_emqx_api_up") == 0
        # publisher role: the replay may publish, so it is the restore at the next connect that fails
        endpoint = "publish/bulk" if status == "401" else "clients/subscribe/bulk"
        if status == "403":
            await sub.disconnect()
            await sub.connect()
            await h.settle()
            metrics = await scrape(h)
        assert sample(metrics, "offline_exhook_emqx_api_errors_total", endpoint=endpoint, status=status) == 1
        failed = [line for line in lines(caplog, logging.ERROR) if line.startswith("client job failed: ")]
        assert failed == [f"client job failed: EmqxApiError: EMQX API at http://127.0.0.1:{h.rest_port}: {reason[10:]}"]
        where = "http://emqx:18083" if status == "401" else "..."
        documented(f"`client job failed: EmqxApiError: EMQX API at {where}: {reason[10:]}`")
        assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
        if status == "401":
            assert sample(metrics, "offline_exhook_replay_failures_total") == 1
            assert sub.deliveries == [] and await h.backend.count_messages() == 1
        assert f"not ready: {reason}" in lines(caplog)
    finally:
        await h.stop()


async def test_replays_fail_when_emqx_api_is_unreachable(tmp_path: Path) -> None:
    closed = free_port()
    h = Harness(SqliteBackend(tmp_path), "v3", extra_hocon=f'exhook.emqx.api_url = "http://127.0.0.1:{closed}"')
    await h.start()
    try:
        status, reason = await readyz(h)
        documented("`emqx_api: unreachable at http://...: ClientConnectorError: ...`", "`unreachable` (no connection)")
        assert status == 503
        assert reason.startswith(f"emqx_api: unreachable at http://127.0.0.1:{closed}: ClientConnector")
        pub = h.client("un-pub")
        await pub.connect()
        await pub.publish("t/un", b"kept", qos=1)
        sub = h.client("un-sub")
        await sub.connect()
        await sub.subscribe("t/un", qos=1)
        await h.settle()

        async def gave_up() -> bool:  # three retries (0.1 + 0.5 + 2 s), then the replay is given up
            return sample(await scrape(h), "offline_exhook_replay_failures_total") == 1
        await eventually(gave_up)
        metrics = await scrape(h)
        assert sample(metrics, "offline_exhook_emqx_api_errors_total", endpoint="publish/bulk",
                      status="unreachable") == 4
        assert await h.backend.count_messages() == 1
    finally:
        await h.stop()


async def test_exhook_never_loaded_by_emqx(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="exhook")
    h = Harness(SqliteBackend(tmp_path), "v3")
    await h.backend.setup()
    await h.start_service()
    try:
        documented('`offline_exhook_hook_calls_total{hook="provider.loaded"} 0`',
                   "no `broker loaded this provider` line")
        # EMQX pointed at the wrong port: it cannot load the service
        wrong = EmqxEmulator(f"127.0.0.1:{free_port()}", "v3", rest_port=free_port())
        with pytest.raises(Exception):  # noqa: B017 -- whatever the emulator raises when it cannot connect
            await wrong.start(load_timeout=1.0)
        metrics = await scrape(h)
        assert sample(metrics, "offline_exhook_hook_calls_total", hook="provider.loaded") == 0
        assert (await readyz(h, "?exclude=emqx_api"))[0] == 200  # the service itself is fine
        assert not [r for r in caplog.records if r.getMessage() == "broker loaded this provider"]
        # the fix: the right url
        right = EmqxEmulator(f"127.0.0.1:{h.grpc_port}", "v3", rest_port=free_port())
        await right.start()
        try:
            assert sample(await scrape(h), "offline_exhook_hook_calls_total", hook="provider.loaded") == 1
            assert [r for r in caplog.records if r.getMessage() == "broker loaded this provider"]
        finally:
            await right.stop()
    finally:
        for service in h.services:
            await service.stop()


async def test_pending_writes_grow_while_the_store_hangs(
    redis_process: RedisProcess, caplog: pytest.LogCaptureFixture
) -> None:
    redis_process.start()
    h = Harness(PrivateRedisBackend(redis_process.port), "v3", publish_deadline="200ms")
    await h.start()
    assert redis_process.proc is not None
    pid = redis_process.proc.pid
    try:
        documented("`offline_exhook_pending_writes` above 0", "`offline_exhook_spool_pending` and "
                   "`offline_exhook_spooled_total` rising",
                   '`offline_exhook_publish_deadline_answers_total{reason="store_slow"}` rising',
                   "`store redis slower than the publish deadline: spooling writes`",
                   "`store slower than publish_deadline: message spooled`",
                   "`spool empty: writing to redis directly again`")
        os.kill(pid, signal.SIGSTOP)  # hung, not gone: connections stay open, nothing answers
        pub = h.client("hang-pub")
        await pub.connect()
        for i in range(5):
            await pub.publish("t/hang", f"m{i}".encode(), qos=1)
        metrics = await scrape(h)
        # the hung write was given up at publish_deadline: nothing waits in memory any more
        assert sample(metrics, "offline_exhook_pending_writes") == 0
        assert sample(metrics, "offline_exhook_spool_pending") == 5
        assert sample(metrics, "offline_exhook_spooled_total") == 5
        assert sample(metrics, "offline_exhook_publish_deadline_answers_total", reason="store_slow") == 5
        shown = lines(caplog)
        assert "store redis slower than the publish deadline: spooling writes" in shown
        assert "store slower than publish_deadline: message spooled" in shown
        await wait_reason(h, "store: redis unreachable: ")
        # the fix: the store answers again; the queue drains by itself
        os.kill(pid, signal.SIGCONT)

        async def drained() -> bool:
            return sample(await scrape(h), "offline_exhook_spool_pending") == 0
        await eventually(drained)
        assert "spool empty: writing to redis directly again" in lines(caplog)
        assert await h.backend.count_messages() == 5
    finally:
        os.kill(pid, signal.SIGCONT)
        await h.stop()


def test_readiness_reports_other_components_conditions() -> None:
    """The write path reports ``writer`` / ``spool`` through ``set_condition``: /readyz lists
    each failing one as ``name: reason``, in the order they first failed."""
    documented("| `writer` | reported by the write path", "`spool draining behind a broken store: ...`")

    class Silent:  # the store and gRPC health are not involved in set_condition
        name = "sqlite"

    readiness = Readiness(Silent(), 1.0, None, None, lambda text: text.replace("s3cret", "******"))  # type: ignore[arg-type]
    readiness.set_condition("store", True)
    readiness.set_condition("writer", False, "stalled for 30 s (s3cret)")
    readiness.set_condition("spool", False, "draining 12 ops behind a broken store")
    assert readiness.reason == "writer: stalled for 30 s (******); spool: draining 12 ops behind a broken store"
    assert readiness.failing(exclude={"writer"}) == ["spool: draining 12 ops behind a broken store"]
    readiness.set_condition("writer", True)
    readiness.set_condition("spool", True, "ignored when ok")
    assert readiness.ready and readiness.reason == ""


async def test_store_misconfigured_is_retried_until_fixed_without_a_restart(caplog: pytest.LogCaptureFixture) -> None:
    import aiomysql

    from storage.mysql import DEFAULT_SCHEMA_DDL
    from tests.e2e.backends import MYSQL, MysqlBackend

    backend = MysqlBackend()
    # no tables, and the service may not create them: the store answers but cannot be used
    h = Harness(backend, "v3", extra_hocon="mysql.init_default_schema = false")
    await h.start()
    try:
        reason = await wait_reason(h, "does not exist")
        documented("reason `store: mysql is not connected yet (...)`", "`mysql: table ... does not exist`",
                   "`mysql misconfigured at start-up, retrying in the background`", "no restart")
        assert reason.startswith("store: mysql is not connected yet (mysql: table ")
        assert any("mysql misconfigured at start-up, retrying in the background" in line for line in lines(caplog))
        pub = h.client("while-broken")
        await pub.connect()
        await pub.publish("t/fix", b"kept in the spool", qos=1)  # answered: the message waits in the spool
        assert h.service.metrics.sample("publish_deadline_answers_total", reason="store_slow") == 1
        # the fix: create the tables; the service takes the store at its next try
        conn = await aiomysql.connect(**MYSQL, db=backend.database, autocommit=True)
        async with conn.cursor() as cur:
            for ddl in DEFAULT_SCHEMA_DDL:
                await cur.execute(ddl)
        conn.close()

        async def ready() -> bool:
            return (await readyz(h))[0] == 200
        await eventually(ready, timeout=20)
        await h.settle()
        assert await backend.count_messages() == 1
    finally:
        await h.stop()


async def test_the_emqx_api_is_not_ready_until_it_has_been_checked_once() -> None:
    """A worker must not report ready between its store answering and its first check
    of EMQX's API (the parent's /readyz would say ready for a moment)."""
    documented("`not checked yet` during start-up")

    class Silent:
        name = "sqlite"

    reports: list[dict[str, tuple[bool, str]]] = []
    readiness = Readiness(Silent(), 1.0, None, None, lambda text: text, reports.append)  # type: ignore[arg-type]
    readiness.set_condition("store", True)
    answer: str | None = "401 unauthorized"
    readiness.add_probe("emqx_api", lambda: answer, checked=False)
    assert readiness.failing() == ["emqx_api: not checked yet"]
    assert reports[-1]["emqx_api"] == (False, "not checked yet")  # the parent hears it at once
    await readiness.probe_now("emqx_api")
    assert readiness.failing() == ["emqx_api: 401 unauthorized"]
    answer = None
    await readiness.probe_now("emqx_api")
    assert readiness.ready
    readiness.add_probe("writer", lambda: None)  # checked=True: ok until its first check says otherwise
    assert readiness.ready
