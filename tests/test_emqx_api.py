"""The REST client against a real aiohttp server: auth, status handling, TLS."""

from __future__ import annotations

import base64
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from exhook.config import EmqxApiConfig, SslOptions
from exhook.emqx_api import REPLAY_PROPERTY, EmqxApi, EmqxApiError, ReplayItem
from tests.e2e.harness import free_port
from tests.redis_servers import TlsMaterial, make_tls_material

KEY, SECRET = "key", "s3cr3t-value"


class FakeEmqx:
    """Just enough of EMQX's two endpoints to see what the client sends."""

    def __init__(self) -> None:
        self.bodies: list[Any] = []
        self.bulk_status = 200

    async def publish_bulk(self, request: web.Request) -> web.Response:
        expected = "Basic " + base64.b64encode(f"{KEY}:{SECRET}".encode()).decode()
        if request.headers.get("Authorization") != expected:
            return web.json_response({"code": "BAD_API_KEY_OR_SECRET"}, status=401)
        body = await request.json()
        self.bodies.append(body)
        if self.bulk_status == 202:
            return web.json_response([{"reason_code": 16, "message": "no_matching_subscribers"}] * len(body),
                                     status=202)
        return web.json_response([{"id": "A" * 32} for _ in body], status=self.bulk_status)

    async def subscribe_bulk(self, request: web.Request) -> web.Response:
        if request.match_info["clientid"] == "gone":
            return web.json_response({"code": "CLIENTID_NOT_FOUND"}, status=404)
        self.bodies.append(await request.json())
        return web.json_response([])


async def serve(fake: FakeEmqx, ssl_context: ssl.SSLContext | None) -> tuple[web.AppRunner, int]:
    app = web.Application()
    app.router.add_post("/api/v5/publish/bulk", fake.publish_bulk)
    app.router.add_post("/api/v5/clients/{clientid}/subscribe/bulk", fake.subscribe_bulk)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=ssl_context).start()
    return runner, port


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsMaterial:
    return make_tls_material(tmp_path_factory.mktemp("rest-tls"))


@pytest.fixture
async def plain() -> AsyncIterator[tuple[FakeEmqx, int]]:
    fake = FakeEmqx()
    runner, port = await serve(fake, None)
    yield fake, port
    await runner.cleanup()


async def client(url: str, key: str = KEY, ssl_opts: SslOptions | None = None) -> EmqxApi:
    api = EmqxApi(EmqxApiConfig(url=url, api_key=key, api_secret=SECRET, ssl=ssl_opts or SslOptions()))
    await api.start()
    return api


async def test_replay_items_are_base64_not_retained_and_marked(plain: tuple[FakeEmqx, int]) -> None:
    fake, port = plain
    api = await client(f"http://127.0.0.1:{port}")
    try:
        result = await api.publish_bulk([ReplayItem("t/1", b"\x00\xffbin", 2, "0" * 32)])
        assert (result.status, result.delivered, result.unmatched) == (200, 1, 0)
        item = fake.bodies[0][0]
        assert base64.b64decode(item["payload"]) == b"\x00\xffbin"
        assert (item["payload_encoding"], item["qos"], item["retain"]) == ("base64", 2, False)
        assert item["properties"]["user_properties"] == {REPLAY_PROPERTY: "0" * 32}
        fake.bulk_status = 202
        result = await api.publish_bulk([ReplayItem("t/1", b"x", 1, "1" * 32)])
        assert (result.status, result.unmatched) == (202, 1)
        with pytest.raises(ValueError):
            await api.publish_bulk([])
    finally:
        await api.close()


async def test_subscribe_bulk_and_a_client_that_left(plain: tuple[FakeEmqx, int]) -> None:
    fake, port = plain
    api = await client(f"http://127.0.0.1:{port}")
    try:
        assert await api.subscribe_bulk("c/1", [("t/#", 1)]) is True
        assert fake.bodies == [[{"topic": "t/#", "qos": 1}]]
        assert await api.subscribe_bulk("gone", [("t/#", 1)]) is False
    finally:
        await api.close()


async def test_bad_api_key_is_a_clear_non_retryable_error(plain: tuple[FakeEmqx, int]) -> None:
    _, port = plain
    api = await client(f"http://127.0.0.1:{port}", key="wrong")
    try:
        with pytest.raises(EmqxApiError) as err:
            await api.publish_bulk([ReplayItem("t", b"x", 1, "0" * 32)])
        assert err.value.status == 401 and not err.value.retryable
        assert SECRET not in str(err.value)
    finally:
        await api.close()


async def test_unreachable_api_is_a_retryable_error() -> None:
    api = await client(f"http://127.0.0.1:{free_port()}")
    try:
        with pytest.raises(EmqxApiError) as err:
            await api.publish_bulk([ReplayItem("t", b"x", 1, "0" * 32)])
        assert err.value.retryable
    finally:
        await api.close()


@pytest.mark.parametrize(
    ("ca", "verify", "sni", "works"),
    [
        ("ca_cert", True, "", True),
        ("other_ca_cert", True, "", False),
        ("other_ca_cert", False, "", True),
        ("ca_cert", True, "localhost", True),
        ("ca_cert", True, "not-the-server.example", False),
    ],
)
async def test_tls_to_the_api(tls: TlsMaterial, ca: str, verify: bool, sni: str, works: bool) -> None:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(tls.server_cert, tls.server_key)
    fake = FakeEmqx()
    runner, port = await serve(fake, server_ctx)
    opts = SslOptions(enable=True, verify=verify, cacertfile=str(getattr(tls, ca)), server_name_indication=sni)
    api = await client(f"https://127.0.0.1:{port}", ssl_opts=opts)
    try:
        if works:
            assert (await api.publish_bulk([ReplayItem("t", b"x", 1, "0" * 32)])).status == 200
        else:
            with pytest.raises(EmqxApiError, match="unreachable"):
                await api.publish_bulk([ReplayItem("t", b"x", 1, "0" * 32)])
            assert fake.bodies == []
    finally:
        await api.close()
        await runner.cleanup()


def test_certificate_files_are_checked(tmp_path: Path) -> None:
    from exhook.config import ConfigError, load_config_string

    with pytest.raises(ConfigError, match=r"exhook\.emqx\.ssl\.certfile"):
        load_config_string('sqlite { enable = true }\n'
                           f'exhook {{ emqx {{ ssl {{ enable = true, certfile = "{tmp_path}/missing.pem" }} }} }}')
