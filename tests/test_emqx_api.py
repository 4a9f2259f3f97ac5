"""The REST client against a real aiohttp server: auth, status handling, TLS."""

from __future__ import annotations

import asyncio
import base64
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from exhook.config import EmqxApiConfig, SslOptions
from exhook.emqx_api import REPLAY_PROPERTY, EmqxApi, EmqxApiError, ReplayItem
from exhook.metrics import Metrics
from tests.e2e.harness import free_port
from tests.redis_servers import TlsMaterial, make_tls_material

KEY, SECRET = "key", "s3cr3t-value"


class FakeEmqx:
    """Just enough of EMQX's two endpoints to see what the client sends."""

    def __init__(self) -> None:
        self.bodies: list[Any] = []
        self.auth: list[str] = []  # every Authorization header publish/bulk received
        self.subscribed: list[str] = []  # the clientid of every subscribe/bulk call
        self.bulk_status = 200
        self.bulk_answers: list[Any] | None = None  # per-item answers of publish/bulk, if not all alike
        self.delay = 0.0
        self.role = "administrator"

    async def publish_bulk(self, request: web.Request) -> web.Response:
        expected = "Basic " + base64.b64encode(f"{KEY}:{SECRET}".encode()).decode()
        self.auth.append(request.headers.get("Authorization", ""))
        if request.headers.get("Authorization") != expected:
            return web.json_response({"code": "BAD_API_KEY_OR_SECRET"}, status=401)
        await asyncio.sleep(self.delay)
        body = await request.json()
        self.bodies.append(body)
        if self.bulk_answers is not None:
            return web.json_response(self.bulk_answers, status=self.bulk_status)
        if self.bulk_status == 202:
            return web.json_response([{"reason_code": 16, "message": "no_matching_subscribers"}] * len(body),
                                     status=202)
        return web.json_response([{"id": "A" * 32} for _ in body], status=self.bulk_status)

    async def exhooks(self, request: web.Request) -> web.Response:
        """GET /api/v5/exhooks: any valid key but a publisher's may read it."""
        expected = "Basic " + base64.b64encode(f"{KEY}:{SECRET}".encode()).decode()
        if request.headers.get("Authorization") != expected:
            return web.json_response({"code": "BAD_API_KEY_OR_SECRET"}, status=401)
        if self.role == "publisher":
            return web.json_response({"code": "UNAUTHORIZED_ROLE"}, status=403)
        return web.json_response([])

    async def subscribe_bulk(self, request: web.Request) -> web.Response:
        self.subscribed.append(request.match_info["clientid"])
        if request.match_info["clientid"] == "gone":
            return web.json_response({"code": "CLIENTID_NOT_FOUND"}, status=404)
        self.bodies.append(await request.json())
        return web.json_response([])

    async def subscribe(self, request: web.Request) -> web.Response:
        """One subscription: 400 for a qos EMQX's schema refuses."""
        self.subscribed.append(request.match_info["clientid"])
        body = await request.json()
        self.bodies.append(body)
        if body["qos"] not in (0, 1, 2):
            return web.json_response({"code": "BAD_REQUEST", "message": "body.qos: expected 0, 1 or 2"}, status=400)
        return web.json_response({"topic": body["topic"], "qos": body["qos"]})


async def serve(fake: FakeEmqx, ssl_context: ssl.SSLContext | None) -> tuple[web.AppRunner, int]:
    app = web.Application()
    app.router.add_post("/api/v5/publish/bulk", fake.publish_bulk)
    app.router.add_post("/api/v5/clients/{clientid}/subscribe/bulk", fake.subscribe_bulk)
    app.router.add_post("/api/v5/clients/{clientid}/subscribe", fake.subscribe)
    app.router.add_get("/api/v5/exhooks", fake.exhooks)
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


async def client(url: str, key: str = KEY, ssl_opts: SslOptions | None = None, metrics: Metrics | None = None,
                 timeout_ms: int = 5000) -> EmqxApi:
    api = EmqxApi(EmqxApiConfig(url=url, api_key=key, api_secret=SECRET, ssl=ssl_opts or SslOptions(),
                                request_timeout_ms=timeout_ms), metrics)
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


async def test_only_items_answered_with_their_id_count_as_delivered(plain: tuple[FakeEmqx, int]) -> None:
    fake, port = plain
    fake.bulk_status = 503
    fake.bulk_answers = [{"id": "A" * 32}, {"reason_code": 16, "message": "no_matching_subscribers"},
                         {"reason_code": 131, "message": "failed_to_dispatch"}]
    api = await client(f"http://127.0.0.1:{port}")
    try:
        result = await api.publish_bulk([ReplayItem("t/1", b"x", 1, f"{i}" * 32) for i in range(3)])
        assert (result.status, result.delivered, result.unmatched, result.failed) == (503, 1, 1, 1)
    finally:
        await api.close()


async def test_a_503_without_one_answer_per_item_is_a_failed_call(plain: tuple[FakeEmqx, int]) -> None:
    # a proxy's error page, or an overloaded node: nothing says what became of each item,
    # so the call failed (retried, then the replay gives its range back)
    fake, port = plain
    fake.bulk_status = 503
    fake.bulk_answers = [{"id": "A" * 32}]  # one answer for two items
    api = await client(f"http://127.0.0.1:{port}")
    try:
        with pytest.raises(EmqxApiError) as failed:
            await api.publish_bulk([ReplayItem("t/1", b"x", 1, f"{i}" * 32) for i in range(2)])
        assert (failed.value.status, failed.value.retryable) == (503, True)
    finally:
        await api.close()


async def test_subscribe_one_filter(plain: tuple[FakeEmqx, int]) -> None:
    fake, port = plain
    api = await client(f"http://127.0.0.1:{port}")
    try:
        assert await api.subscribe("c.1/x", "t/#", 1) is True
        with pytest.raises(EmqxApiError) as refused:
            await api.subscribe("c.1/x", "t/#", 3)
        assert (refused.value.status, refused.value.retryable) == (400, False)
        assert fake.bodies == [{"topic": "t/#", "qos": 1}, {"topic": "t/#", "qos": 3}]
        assert fake.subscribed == ["c.1/x", "c.1/x"]
    finally:
        await api.close()


async def test_subscribe_bulk_names_any_clientid(plain: tuple[FakeEmqx, int]) -> None:
    # "." and ".." are path segments a URL library removes; "/", "%", "?" and "#" end or
    # change the path unless encoded
    fake, port = plain
    api = await client(f"http://127.0.0.1:{port}")
    names = ["..", ".", "a/b", "100%", "q?x=1", "h#1", "../../publish", "sp ace", "ünï"]
    try:
        for name in names:
            assert await api.subscribe_bulk(name, [("t/#", 1)]) is True
    finally:
        await api.close()
    assert fake.subscribed == names


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


async def test_an_https_url_without_an_ssl_block_is_verified(tls: TlsMaterial) -> None:
    # the server's certificate chains to a CA the system does not trust: nothing,
    # the credentials included, may be sent to it
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(tls.server_cert, tls.server_key)
    fake = FakeEmqx()
    runner, port = await serve(fake, server_ctx)
    api = await client(f"https://127.0.0.1:{port}")
    try:
        with pytest.raises(EmqxApiError, match="unreachable"):
            await api.publish_bulk([ReplayItem("t", b"x", 1, "0" * 32)])
        assert fake.bodies == [] and fake.auth == []
    finally:
        await api.close()
        await runner.cleanup()


def test_certificate_files_are_checked(tmp_path: Path, tls: TlsMaterial) -> None:
    from exhook.config import ConfigError, load_config_string

    def api_ssl(block: str, url: str = "https://emqx:18083") -> None:
        load_config_string(f'sqlite {{ enable = true }}\nexhook {{ emqx {{ api_url = "{url}", ssl {{ {block} }} }} }}')

    with pytest.raises(ConfigError, match=r"exhook\.emqx\.ssl\.certfile"):
        api_ssl(f'enable = true, certfile = "{tmp_path}/missing.pem"')
    # a file that is there but is no certificate: one line naming the field, at start-up
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"^exhook\.emqx\.ssl\.cacertfile: cannot load"):
        api_ssl(f'enable = true, cacertfile = "{garbage}"')
    with pytest.raises(ConfigError, match=r"^exhook\.emqx\.ssl\.certfile: cannot load"):
        api_ssl(f'enable = true, certfile = "{garbage}", keyfile = "{tls.client_key}"')
    api_ssl(f'enable = true, cacertfile = "{tls.ca_cert}"')
    # TLS options with an http:// URL would send the API secret in clear text
    with pytest.raises(ConfigError, match=r"^exhook\.emqx\.ssl\.enable: TLS needs an https:// api_url"):
        api_ssl(f'enable = true, cacertfile = "{tls.ca_cert}"', url="http://emqx:18083")


async def test_failures_are_counted_with_one_status_vocabulary(plain: tuple[FakeEmqx, int]) -> None:
    """The HTTP code when EMQX answered, else ``unreachable`` or ``timeout``: never a vague ``error``."""
    fake, port = plain
    metrics = Metrics()
    item = [ReplayItem("t", b"x", 1, "0" * 32)]
    wrong = await client(f"http://127.0.0.1:{port}", key="wrong", metrics=metrics)
    down = await client(f"http://127.0.0.1:{free_port()}", metrics=metrics)
    slow = await client(f"http://127.0.0.1:{port}", metrics=metrics, timeout_ms=50)
    try:
        fake.bulk_status = 503
        for api in (wrong, down, await client(f"http://127.0.0.1:{port}", metrics=metrics)):
            try:
                await api.publish_bulk(item)
            except EmqxApiError:
                pass
        fake.bulk_status, fake.delay = 200, 0.5
        with pytest.raises(EmqxApiError, match="no answer within 50 ms") as err:
            await slow.publish_bulk(item)
        assert err.value.status == "timeout" and err.value.retryable
    finally:
        for api in (wrong, down, slow):
            await api.close()
    counted = {s.labels["status"]: s.value for f in metrics.registry.collect() if f.name.endswith("emqx_api_errors")
               for s in f.samples if s.name.endswith("_total")}
    assert counted == {"401": 1, "unreachable": 1, "503": 1, "timeout": 1}


async def test_the_readiness_check_says_what_is_wrong(plain: tuple[FakeEmqx, int]) -> None:
    fake, port = plain
    metrics = Metrics()
    good, wrong = await client(f"http://127.0.0.1:{port}", metrics=metrics), await client(
        f"http://127.0.0.1:{port}", key="wrong", metrics=metrics)
    down = await client(f"http://127.0.0.1:{free_port()}", metrics=metrics)
    try:
        assert await good.check() is None
        assert await wrong.check() == "401 unauthorized (check exhook.emqx.api_key / api_secret)"
        assert (await down.check() or "").startswith("unreachable at http://127.0.0.1:")
        fake.role = "publisher"
        assert await good.check() == "403 forbidden (the API key needs the administrator role)"
    finally:
        for api in (good, wrong, down):
            await api.close()
    # the check is readiness's, shown by emqx_api_up: not counted as a failed call
    assert metrics.sample("emqx_api_errors_total", endpoint="check", status="401") == 0
    assert not [s for f in metrics.registry.collect() if f.name.endswith("emqx_api_errors") for s in f.samples]
