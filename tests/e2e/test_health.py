"""Health and readiness as an orchestrator sees them: /healthz, /readyz and the
standard gRPC health service flip when the backend goes away and comes back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from exhook.server import Service
from tests.e2e.harness import Harness
from tests.e2e.test_outages import PrivateMysqlBackend, PrivateRedisBackend, RedisProcess, mariadb, redis_process
from tests.mysql_tls import MariaDbServer

__all__ = ["mariadb", "redis_process"]  # fixtures used here

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
GRPC_NAMES = ("", "emqx.exhook.v3.HookProvider", "emqx.exhook.v2.HookProvider")


async def http_get(service: Service, path: str) -> tuple[int, Any]:
    assert service.http is not None
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{service.http.port}{path}") as resp:
            return resp.status, await resp.json()


async def grpc_status(h: Harness, name: str) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{h.grpc_port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        answer = await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
        return int(answer.status)


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def assert_ready(h: Harness, ready: bool, reason_has: str = "") -> None:
    """Wait for the flip (the check runs every 200 ms), then assert every view agrees."""
    async def flipped() -> bool:
        status, _ = await http_get(h.service, "/readyz")
        return (status == 200) == ready
    await eventually(flipped)
    status, body = await http_get(h.service, "/readyz")
    if ready:
        assert (status, body["status"]) == (200, "ready")
    else:
        assert (status, body["status"]) == (503, "not ready")
        assert reason_has in body["reason"]
    want = SERVING if ready else NOT_SERVING
    assert [await grpc_status(h, name) for name in GRPC_NAMES] == [want] * len(GRPC_NAMES)
    assert h.service.metrics.sample("backend_up") == (1 if ready else 0)
    # liveness never follows the backend: the process answers hooks either way
    assert await http_get(h.service, "/healthz") == (200, {"status": "up"})


async def test_redis_readiness_flips_with_the_server(redis_process: RedisProcess) -> None:
    h = Harness(PrivateRedisBackend(redis_process.port), "v3")
    await h.start()  # Redis is not running yet
    try:
        await assert_ready(h, False, "redis is not connected yet (")  # with the reason the open failed
        redis_process.start()
        await assert_ready(h, True)
        redis_process.kill()
        await assert_ready(h, False, "redis unreachable")
        redis_process.start()
        await assert_ready(h, True)
    finally:
        await h.stop()


async def test_mysql_readiness_flips_with_the_server(mariadb: MariaDbServer) -> None:
    h = Harness(PrivateMysqlBackend(mariadb), "v3")
    await h.start()
    try:
        await assert_ready(h, True)
        await asyncio.to_thread(mariadb.stop)
        await assert_ready(h, False, "mysql unreachable")
        await asyncio.to_thread(mariadb.start)
        await assert_ready(h, True)
    finally:
        await h.stop()


async def test_shutdown_turns_grpc_health_to_not_serving(redis_process: RedisProcess) -> None:
    redis_process.start()
    h = Harness(PrivateRedisBackend(redis_process.port), "v3")
    await h.start()
    try:
        await assert_ready(h, True)
        readiness = h.service.readiness
        assert readiness is not None
        await readiness.shutting_down()
        assert [await grpc_status(h, name) for name in GRPC_NAMES] == [NOT_SERVING] * len(GRPC_NAMES)
        status, body = await http_get(h.service, "/readyz")
        assert (status, body["reason"]) == (503, "shutting down")
        await readiness.check()  # a later successful ping does not undo the shutdown
        assert await grpc_status(h, "") == NOT_SERVING
    finally:
        await h.stop()


async def test_failed_store_operations_are_counted_by_operation(redis_process: RedisProcess) -> None:
    h = Harness(PrivateRedisBackend(redis_process.port), "v3")
    await h.start()  # Redis is not running: every store call fails
    try:
        sub = h.client("counted")
        await sub.connect()
        await sub.subscribe("t/down", qos=1)
        metrics = h.service.metrics

        async def still_trying() -> bool:  # a subscription write is tried until the store takes it
            return metrics.sample("store_failures_total", operation="save_subscription") >= 5
        await eventually(still_trying)
        # the restore at connect reset the replay marks first: 4 attempts, then it gave up
        assert metrics.sample("store_failures_total", operation="fresh_session_subscriptions") == 4
        assert metrics.sample("store_failures_total", operation="write") == 0
        assert metrics.sample("store_failures_total", operation="ping") == 0
    finally:
        await h.stop()
