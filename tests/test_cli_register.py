"""``offline-exhook register`` against the emulator's ``/api/v5/exhooks`` (tests/emulator/exhooks_api.py),
and that emulated API itself."""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from exhook.emqx_api import basic_auth
from tests.cli_run import run_cli
from tests.e2e.harness import free_port
from tests.emulator import EmqxEmulator, exhooks_api
from tests.emulator.rest import RestApi
from tests.redis_servers import TlsMaterial

pytest_plugins = ["tests.redis_fixtures"]

ROOT = Path(__file__).resolve().parent.parent
KEY, SECRET = "ops", "s3cret-for-register"
SSL_DEFAULTS = exhooks_api.SSL_DEFAULTS


async def cli(argv: list[str]) -> int:
    # main() runs its own event loop: give it a thread, the emulator keeps this one
    return await asyncio.to_thread(run_cli, argv)


@pytest.fixture
async def emqx() -> AsyncIterator[RestApi]:
    emu = EmqxEmulator(f"127.0.0.1:{free_port()}", api_key=KEY, api_secret=SECRET)  # REST only, never started
    api = RestApi(emu, KEY, SECRET)
    await api.start()
    try:
        yield api
    finally:
        await api.stop()


def api_url(api: RestApi) -> str:
    assert api._runner is not None
    host, port = api._runner.addresses[0][:2]
    return f"http://{host}:{port}"


def write_config(tmp_path: Path, api: RestApi | str, *, listen: str = "127.0.0.1:9000", secret: str = SECRET,
                 ssl: str = "", publish_deadline: str = "500ms", hook_timeout: str = "5s") -> Path:
    url = api if isinstance(api, str) else api_url(api)
    path = tmp_path / "register.hocon"
    path.write_text(
        f'exhook {{ listen = "{listen}", publish_deadline = {publish_deadline}, '
        f'http {{ listen = "127.0.0.1:{free_port()}" }}, {ssl}\n'
        f'  emqx {{ api_url = "{url}", api_key = "{KEY}", api_secret = "{secret}", request_timeout = 3s, '
        f'hook_timeout = {hook_timeout} }} }}\n'
        f'sqlite {{ enable = true, path = "{tmp_path}/db.sqlite3", topics = ["t/#"] }}\n'
    )
    return path


def calls(api: RestApi) -> list[tuple[str, str, int | None]]:
    out = [(r.method, r.path, r.status) for r in api.requests]
    api.requests.clear()
    return out


PATH = "/exhooks/offline-exhook"


async def test_register_posts_then_does_nothing_then_puts_what_changed(
    tmp_path: Path, emqx: RestApi, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = str(write_config(tmp_path, emqx))
    assert await cli(["register", "--config", cfg]) == 0
    assert calls(emqx) == [("GET", PATH, 404), ("POST", "/exhooks", 200)]
    out = capsys.readouterr().out
    assert out == (f"offline-exhook: registered exhook 'offline-exhook' (url http://127.0.0.1:9000) "
                   f"in EMQX at {api_url(emqx)}\n")
    assert emqx.exhooks.servers == [{
        "name": "offline-exhook", "enable": True, "url": "http://127.0.0.1:9000", "request_timeout": "5s",
        # the defaults: a down service must not deny publishes; EMQX retries loading it after 10 s
        "failed_action": "ignore", "auto_reconnect": "10s", "pool_size": 8,
        "socket_options": {"keepalive": True, "nodelay": True}, "ssl": {**SSL_DEFAULTS, "enable": False},
    }]

    # the same again: only a look
    assert await cli(["register", "--config", cfg]) == 0
    assert calls(emqx) == [("GET", PATH, 200)]
    assert capsys.readouterr().out == (
        "offline-exhook: exhook 'offline-exhook' is already registered with these settings: nothing to do\n")

    # other settings: one PUT with the whole entry
    argv = ["register", "--config", cfg, "--pool-size", "16", "--failed-action", "deny",
            "--request-timeout", "5000ms"]  # 5000ms = 5s: not a change
    assert await cli(argv) == 0
    assert calls(emqx) == [("GET", PATH, 200), ("PUT", PATH, 200)]
    assert capsys.readouterr().out == (
        "offline-exhook: updated exhook 'offline-exhook' (changed: failed_action, pool_size)\n")
    server = emqx.exhooks.servers[0]
    assert (server["pool_size"], server["failed_action"], server["request_timeout"]) == (16, "deny", "5s")
    assert len(emqx.exhooks.servers) == 1

    assert await cli(argv) == 0
    assert calls(emqx) == [("GET", PATH, 200)]


async def test_register_takes_over_an_entry_made_by_hand(
    tmp_path: Path, emqx: RestApi, capsys: pytest.CaptureFixture[str]
) -> None:
    other = {"name": "other", "url": "http://10.0.0.1:9000"}
    emqx.exhooks.servers += [exhooks_api.check_server_config(other), exhooks_api.check_server_config(
        {"name": "ox", "url": "http://old:9000", "enable": False, "auto_reconnect": False, "request_timeout": 4000})]
    cfg = str(write_config(tmp_path, emqx))
    argv = ["register", "--config", cfg, "--name", "ox", "--url", "http://offline-exhook:9000/",
            "--auto-reconnect", "30s"]
    assert await cli(argv) == 0
    assert calls(emqx) == [("GET", "/exhooks/ox", 200), ("PUT", "/exhooks/ox", 200)]
    assert capsys.readouterr().out == (
        "offline-exhook: updated exhook 'ox' (changed: enable, url, request_timeout, failed_action, auto_reconnect)\n")
    ox = emqx.exhooks.find("ox")
    assert ox is not None
    assert (ox["enable"], ox["url"], ox["auto_reconnect"], ox["request_timeout"]) == (
        True, "http://offline-exhook:9000", "30s", "5s")
    assert emqx.exhooks.find("other") == exhooks_api.check_server_config(other)  # untouched


async def test_a_registration_racing_ours_is_updated(
    tmp_path: Path, emqx: RestApi, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real_check = exhooks_api.check_server_config

    def someone_else_was_faster(body: Any) -> dict[str, Any]:
        if not emqx.exhooks.servers:  # between our GET and our POST
            emqx.exhooks.servers.append(real_check({"name": "offline-exhook", "url": "http://elsewhere:1"}))
        return real_check(body)

    monkeypatch.setattr(exhooks_api, "check_server_config", someone_else_was_faster)
    assert await cli(["register", "--config", str(write_config(tmp_path, emqx))]) == 0
    assert calls(emqx) == [("GET", PATH, 404), ("POST", "/exhooks", 400), ("GET", PATH, 200), ("PUT", PATH, 200)]
    # the hand-made entry has EMQX's defaults (deny, 60s), not the command's
    assert capsys.readouterr().out == (
        "offline-exhook: updated exhook 'offline-exhook' (changed: url, failed_action, auto_reconnect)\n")
    assert [s["url"] for s in emqx.exhooks.servers] == ["http://127.0.0.1:9000"]


async def test_the_url_defaults_to_this_host_and_the_listen_port(tmp_path: Path, emqx: RestApi) -> None:
    cfg = str(write_config(tmp_path, emqx, listen="0.0.0.0:9123"))
    assert await cli(["register", "--config", cfg]) == 0
    assert emqx.exhooks.servers[0]["url"] == f"http://{socket.gethostname()}:9123"


async def test_tls_registration_gives_emqx_an_https_url_and_its_ssl_block(
    tmp_path: Path, emqx: RestApi, redis_tls: TlsMaterial, capsys: pytest.CaptureFixture[str]
) -> None:
    t = redis_tls
    ssl = (f'ssl {{ enable = true, certfile = "{t.server_cert}", keyfile = "{t.server_key}", '
           f'cacertfile = "{t.ca_cert}", verify = verify_peer }},')
    cfg = str(write_config(tmp_path, emqx, ssl=ssl, listen="127.0.0.1:9443"))
    # mutual TLS: EMQX needs a client certificate
    assert await cli(["register", "--config", cfg]) == 2
    assert capsys.readouterr().err == (
        "offline-exhook: exhook.ssl.verify = verify_peer: EMQX must present a client certificate: "
        "give --ssl-certfile and --ssl-keyfile (paths as EMQX sees them)\n")
    assert await cli(["register", "--config", cfg, "--url", "http://127.0.0.1:9443"]) == 2
    assert "use https://" in capsys.readouterr().err
    assert calls(emqx) == []

    argv = ["register", "--config", cfg, "--ssl-cacertfile", "/etc/emqx/certs/ox-ca.pem",
            "--ssl-certfile", "/etc/emqx/certs/emqx.pem", "--ssl-keyfile", "/etc/emqx/certs/emqx.key",
            "--ssl-server-name", "offline-exhook"]
    assert await cli(argv) == 0
    assert calls(emqx) == [("GET", PATH, 404), ("POST", "/exhooks", 200)]
    server = emqx.exhooks.servers[0]
    assert server["url"] == "https://127.0.0.1:9443"
    assert server["ssl"] == {**SSL_DEFAULTS, "enable": True, "verify": "verify_peer",
                             "cacertfile": "/etc/emqx/certs/ox-ca.pem", "certfile": "/etc/emqx/certs/emqx.pem",
                             "keyfile": "/etc/emqx/certs/emqx.key", "server_name_indication": "offline-exhook"}
    # EMQX fills in TLS defaults of its own: still the same registration
    assert await cli(argv) == 0
    assert calls(emqx) == [("GET", PATH, 200)]
    # without the CA EMQX cannot verify the service: allowed, with a warning, and it is a change
    assert await cli(argv[:3] + argv[5:]) == 0
    assert calls(emqx) == [("GET", PATH, 200), ("PUT", PATH, 200)]
    captured = capsys.readouterr()
    assert "changed: ssl.verify, ssl.cacertfile" in captured.out
    assert "warning: no --ssl-cacertfile" in captured.err


async def test_an_https_api_url_without_an_ssl_block_is_verified(
    tmp_path: Path, redis_tls: TlsMaterial, capsys: pytest.CaptureFixture[str]
) -> None:
    # the API's certificate chains to a CA the system does not trust: nothing, the
    # API secret in the Authorization header least of all, may be sent to it
    calls: list[str] = []

    async def answer(request: web.Request) -> web.Response:
        calls.append(request.method)
        if request.method == "GET":
            return web.json_response({"code": "NOT_FOUND", "message": "Server not found"}, status=404)
        return web.json_response({})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(redis_tls.server_cert, redis_tls.server_key)
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=server_ctx).start()
    try:
        url = f"https://127.0.0.1:{port}"
        cfg = write_config(tmp_path, url)
        assert await cli(["register", "--config", str(cfg)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"offline-exhook: EMQX API unreachable at {url}: ") and "certificate" in err, err
        assert calls == []
        # with its CA in an ssl block, the same API is trusted
        trusted = f'ssl {{ enable = true, cacertfile = "{redis_tls.ca_cert}" }}'
        cfg.write_text(cfg.read_text().replace("request_timeout = 3s", f"request_timeout = 3s, {trusted}"))
        assert await cli(["register", "--config", str(cfg)]) == 0
        assert calls == ["GET", "POST"]
    finally:
        await runner.cleanup()


async def test_ssl_options_without_tls_and_bad_options_are_usage_errors(
    tmp_path: Path, emqx: RestApi, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = str(write_config(tmp_path, emqx))
    cases = {
        ("--ssl-cacertfile", "/x"): "offline-exhook: --ssl-*: the service listens without TLS "
                                    "(exhook.ssl.enable = false)\n",
        ("--url", "https://h:9000"): "offline-exhook: --url: the service listens without TLS "
                                     "(exhook.ssl.enable = false): use http://\n",
        ("--name", "bad name"): "offline-exhook: --name: 'bad name' is not an EMQX exhook name (letters, digits, "
                                "- and _; starting with a letter or digit)\n",
        ("--request-timeout", "soon"): "offline-exhook: --request-timeout: expected a duration such as 5s, "
                                       "got 'soon'\n",
        ("--pool-size", "0"): "offline-exhook: --pool-size: must be at least 1\n",
    }
    for extra, message in cases.items():
        assert await cli(["register", "--config", cfg, *extra]) == 2
        assert capsys.readouterr().err == message
    assert calls(emqx) == []


async def test_a_short_request_timeout_is_registered_with_a_warning(
    tmp_path: Path, emqx: RestApi, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = str(write_config(tmp_path, emqx, publish_deadline="2s"))
    assert await cli(["register", "--config", cfg, "--request-timeout", "1s"]) == 0
    assert "warning: request_timeout 1s is not above exhook.publish_deadline (2000 ms)" in capsys.readouterr().err
    assert emqx.exhooks.servers[0]["request_timeout"] == "1s"


async def test_the_request_timeout_registered_is_the_configs_hook_timeout(
    tmp_path: Path, emqx: RestApi, capsys: pytest.CaptureFixture[str]
) -> None:
    # the service takes a connect call for lost after twice the broker's timeout: the two must agree
    cfg = str(write_config(tmp_path, emqx, hook_timeout="3s"))
    assert await cli(["register", "--config", cfg]) == 0
    assert emqx.exhooks.servers[0]["request_timeout"] == "3s"
    assert "warning" not in capsys.readouterr().err
    assert await cli(["register", "--config", cfg, "--request-timeout", "4s"]) == 0
    assert ("warning: request_timeout 4s is not exhook.emqx.hook_timeout (3s): the service takes connect calls "
            "served with under half of the latter left as signs of dropped ones") in capsys.readouterr().err
    assert emqx.exhooks.servers[0]["request_timeout"] == "4s"


async def test_errors_are_one_line(
    tmp_path: Path, emqx: RestApi, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = api_url(emqx)
    assert await cli(["register", "--config", str(write_config(tmp_path, emqx, secret="wrong"))]) == 1
    assert capsys.readouterr().err == (
        f"offline-exhook: EMQX API at {url} refused the API key (401 BAD_API_KEY_OR_SECRET): "
        "check exhook.emqx.api_key / api_secret\n")

    down = f"http://127.0.0.1:{free_port()}"
    assert await cli(["register", "--config", str(write_config(tmp_path, down))]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"offline-exhook: EMQX API unreachable at {down}: ClientConnectorError")
    assert err.count("\n") == 1

    def refuse(body: Any) -> dict[str, Any]:
        raise exhooks_api._BadRequest("url: invalid_url")

    monkeypatch.setattr(exhooks_api, "check_server_config", refuse)
    assert await cli(["register", "--config", str(write_config(tmp_path, emqx))]) == 1
    assert capsys.readouterr().err == (
        "offline-exhook: EMQX rejected exhook 'offline-exhook': 400 BAD_REQUEST: url: invalid_url\n")
    assert emqx.exhooks.servers == []

    emqx.api_role = "publisher"
    assert await cli(["register", "--config", str(write_config(tmp_path, emqx))]) == 1
    assert capsys.readouterr().err == (
        f"offline-exhook: EMQX API at {url} refused GET /api/v5/exhooks/offline-exhook (403 UNAUTHORIZED_ROLE): "
        "the API key needs the administrator role\n")


async def test_register_as_a_subprocess(tmp_path: Path, emqx: RestApi) -> None:
    cfg = str(write_config(tmp_path, emqx))
    command = [sys.executable, "-m", "exhook", "--config", cfg, "register", "--url", "http://ox:9000"]
    for expected in ("registered exhook", "already registered"):
        proc = await asyncio.to_thread(subprocess.run, command, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert expected in proc.stdout and SECRET not in proc.stdout + proc.stderr
    assert [s["url"] for s in emqx.exhooks.servers] == ["http://ox:9000"]


# -- the emulated API itself ------------------------------------------------------------------------------------


async def test_emulated_exhooks_api_answers_as_emqx(emqx: RestApi) -> None:
    base = api_url(emqx) + "/api/v5/exhooks"
    async with aiohttp.ClientSession(headers={"Authorization": basic_auth(KEY, SECRET)}) as http:

        async def call(method: str, url: str, body: Any = None) -> tuple[int, Any]:
            async with http.request(method, url, json=body) as resp:
                return resp.status, (await resp.json() if resp.content_length else None)

        assert await call("GET", base) == (200, [])
        bad_request = [
            {"url": "http://a:1"},
            {"name": "a", "url": "http://a:1", "colour": "red"},
            {"name": "-a", "url": "http://a:1"},
            {"name": "a", "url": "http://a:1", "failed_action": "panic"},
            {"name": "a", "url": "http://a:1", "pool_size": 0},
            {"name": "a", "url": "http://a:1", "request_timeout": "soon"},
            {"name": "a", "url": "http://a:1", "ssl": {"enable": True, "verify": "maybe"}},
        ]
        for body in bad_request:
            status, answer = await call("POST", base, body)
            assert (status, answer["code"]) == (400, "BAD_REQUEST"), body
        status, created = await call("POST", base, {"name": "a", "url": "http://a:1", "auto_reconnect": False})
        assert status == 200
        assert created["auto_reconnect"] is False and created["pool_size"] == 8 and created["hooks"] == []
        assert created["node_status"] == [{"node": "emqx@127.0.0.1", "status": "connecting"}]
        assert set(created["metrics"]) == {"succeed", "failed", "rate", "max_rate"}
        assert await call("POST", base, {"name": "a", "url": "http://b:2"}) == (
            400, {"code": "BAD_REQUEST", "message": "Already exists"})
        assert await call("GET", base + "/nope") == (404, {"code": "BAD_REQUEST", "message": "Server not found"})
        assert await call("PUT", base + "/nope", {"name": "nope", "url": "http://n:1"}) == (
            404, {"code": "NOT_FOUND", "message": "Server not found"})
        status, updated = await call("PUT", base + "/a", {"name": "a", "url": "http://a:2", "enable": False})
        assert status == 200 and updated["url"] == "http://a:2" and updated["auto_reconnect"] == "60s"
        assert updated["node_status"][0]["status"] == "disabled"
        status, listed = await call("GET", base)
        assert status == 200 and [s["url"] for s in listed] == ["http://a:2"]
        assert await call("DELETE", base + "/a") == (204, None)
        assert await call("DELETE", base + "/a") == (404, {"code": "BAD_REQUEST", "message": "Server not found"})
        assert await call("GET", base) == (200, [])
