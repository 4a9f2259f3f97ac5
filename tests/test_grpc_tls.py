"""TLS on the gRPC listener (``exhook.ssl``), end to end: the real service in-process,
a throwaway CA made with openssl, and the EMQX emulator connecting with EMQX's
``exhook.servers[].ssl`` options (or a bare gRPC client where a broker could not
even be configured that way).

Server-only TLS (``verify = verify_none`` on the service): a client that trusts the
CA gets in; a plaintext client and a client trusting another CA are refused.
Mutual TLS (``verify = verify_peer``): only a client certificate signed by the CA
gets in. A refusal is ``UNAVAILABLE`` (the handshake fails, no RPC is served).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from exhook.config import HostPort, load_config_string
from exhook.pb.v3 import exhook_pb2 as pb
from exhook.pb.v3 import exhook_pb2_grpc as pb_grpc
from exhook.server import Service
from tests.certs import Certs, make_certs, openssl_available
from tests.e2e.backends import SqliteBackend
from tests.e2e.harness import free_port
from tests.emulator import EmqxEmulator, ExHookSsl, HookLoadError

pytestmark = pytest.mark.skipif(not openssl_available(), reason="needs the openssl command")

SERVER_NAME = "offline-exhook"
API_KEY, API_SECRET = "offline-exhook", "tls-secret"
HOOKS = {"session.created", "client.connected", "session.subscribed", "session.unsubscribed", "session.resumed",
         "message.publish", "message.acked"}

StartService = Callable[..., Awaitable[Service]]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("grpc-tls"), server_name=SERVER_NAME)


@pytest.fixture
async def start_service(tmp_path: Path, certs: Certs) -> AsyncIterator[StartService]:
    """Starts the service with TLS on a free loopback port; ``verify_peer`` makes it mutual."""
    started: list[Service] = []

    async def start(*, verify_peer: bool, rest_port: int = 0) -> Service:
        text = f"""
        {SqliteBackend(tmp_path).hocon(["t/#"], 0, 10)}
        exhook {{
          publish_deadline = 500ms
          ssl {{
            enable = true
            certfile = "{certs.server_cert}"
            keyfile = "{certs.server_key}"
            cacertfile = "{certs.ca}"
            verify = {"verify_peer" if verify_peer else "verify_none"}
          }}
          http {{ enable = false }}
          emqx {{ api_url = "http://127.0.0.1:{rest_port or free_port()}", api_key = "{API_KEY}",
                  api_secret = "{API_SECRET}" }}
        }}
        """
        cfg = load_config_string(text)
        assert cfg.service.ssl.enable and cfg.service.ssl.verify_peer == verify_peer
        service = Service(dataclasses.replace(
            cfg, service=dataclasses.replace(cfg.service, listen=HostPort("127.0.0.1", 0), workers=1)))
        await service.start()
        started.append(service)
        return service

    yield start
    for service in started:
        await service.stop()


def tls_options(certs: Certs, **overrides: str) -> dict[str, Any]:
    """The emulator's ``ssl`` block: EMQX trusting our CA, checking the server's name."""
    return {"enable": True, "cacertfile": str(certs.ca), "verify": "verify_peer", **overrides}


def emulator(service: Service, rest_port: int, ssl: dict[str, Any] | None) -> EmqxEmulator:
    return EmqxEmulator(f"127.0.0.1:{service.port}", "v3", api_key=API_KEY, api_secret=API_SECRET,
                        rest_port=rest_port, pool_size=2, request_timeout=5.0, ssl=ssl)


async def provider_loaded(channel: grpc.aio.Channel) -> set[str]:
    """One OnProviderLoaded call, without waiting for the channel to become ready."""
    answer = await pb_grpc.HookProviderStub(channel).OnProviderLoaded(pb.ProviderLoadedRequest(), timeout=5)
    return {hook.name for hook in answer.hooks}


async def assert_refused(channel: grpc.aio.Channel) -> None:
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await provider_loaded(channel)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value


def secure(service: Service, roots: Path, cert: Path | None = None, key: Path | None = None) -> grpc.aio.Channel:
    creds = grpc.ssl_channel_credentials(roots.read_bytes(), key.read_bytes() if key else None,
                                         cert.read_bytes() if cert else None)
    return grpc.aio.secure_channel(f"127.0.0.1:{service.port}", creds,
                                   options=[("grpc.ssl_target_name_override", SERVER_NAME)])


async def round_trip(emu: EmqxEmulator, service: Service, store: SqliteBackend, topic: str) -> None:
    """A message published with no subscriber is stored, then replayed to the first subscriber
    (through the REST API, over the TLS-protected hook calls) and deleted by its acknowledgement."""
    assert set(emu.hooks.hookspec) == HOOKS
    publisher = emu.client("tls-pub")
    await publisher.connect()
    await publisher.publish(topic, b"over tls", qos=1)
    await service.idle()
    assert await store.count_messages() == 1
    subscriber = emu.client("tls-sub")
    await subscriber.connect()
    await subscriber.subscribe(topic, qos=1)
    [delivery] = await subscriber.wait_for_deliveries(1, timeout=10)
    assert (delivery.topic, delivery.payload, delivery.qos) == (topic, b"over tls", 1)
    for _ in range(3):
        await emu.settle()
        await service.idle()
    assert await store.count_messages() == 0
    calls = [c for c in emu.calls if c.hook != "provider.loaded"]
    assert calls and all(c.status == "ok" for c in calls), [(c.hook, c.status, c.error) for c in calls]
    assert not emu.errors


# ---------------------------------------------------------------------------- server-only TLS


@pytest.mark.parametrize("sni", ["", SERVER_NAME], ids=["name-from-ip-target", "sni"])
async def test_server_tls_emulator_trusting_the_ca_loads_and_round_trips(
    start_service: StartService, certs: Certs, tmp_path: Path, sni: str
) -> None:
    rest_port = free_port()
    service = await start_service(verify_peer=False, rest_port=rest_port)
    async with emulator(service, rest_port, tls_options(certs, server_name_indication=sni)) as emu:
        await round_trip(emu, service, SqliteBackend(tmp_path), "t/server-tls")


async def test_server_tls_emqx_default_verify_none_connects_without_knowing_the_ca(
    start_service: StartService,
) -> None:
    """EMQX's default ``verify = verify_none`` checks neither the chain nor the name."""
    service = await start_service(verify_peer=False)
    emu = emulator(service, free_port(), {"enable": True})
    assert emu.hooks.ssl == ExHookSsl(enable=True, verify="verify_none")
    async with emu:
        assert set(emu.hooks.hookspec) == HOOKS


async def test_server_tls_refuses_a_plaintext_client(start_service: StartService) -> None:
    service = await start_service(verify_peer=False)
    await assert_refused(grpc.aio.insecure_channel(f"127.0.0.1:{service.port}"))
    emu = emulator(service, free_port(), None)  # EMQX with url = "http://..."
    with pytest.raises(HookLoadError):
        await emu.start(load_timeout=1)


async def test_server_tls_refuses_a_client_trusting_another_ca(start_service: StartService, certs: Certs) -> None:
    service = await start_service(verify_peer=False)
    await assert_refused(secure(service, certs.other_ca))
    emu = emulator(service, free_port(), tls_options(certs, cacertfile=str(certs.other_ca)))
    with pytest.raises(HookLoadError):
        await emu.start(load_timeout=1)


async def test_server_tls_name_mismatch_is_refused_by_the_client(start_service: StartService, certs: Certs) -> None:
    """``verify_peer`` checks the name too: a server_name_indication the certificate does not carry fails;
    ``disable`` turns the name check off (the chain is still checked)."""
    service = await start_service(verify_peer=False)
    emu = emulator(service, free_port(), tls_options(certs, server_name_indication="not-the-service"))
    with pytest.raises(HookLoadError):
        await emu.start(load_timeout=1)
    async with emulator(service, free_port(), tls_options(certs, server_name_indication="disable")) as emu:
        assert set(emu.hooks.hookspec) == HOOKS


# ---------------------------------------------------------------------------- mutual TLS


async def test_mutual_tls_accepts_a_client_certificate_signed_by_the_ca(
    start_service: StartService, certs: Certs, tmp_path: Path
) -> None:
    rest_port = free_port()
    service = await start_service(verify_peer=True, rest_port=rest_port)
    async with secure(service, certs.ca, certs.client_cert, certs.client_key) as channel:
        assert await provider_loaded(channel) == HOOKS
    ssl = tls_options(certs, certfile=str(certs.client_cert), keyfile=str(certs.client_key))
    async with emulator(service, rest_port, ssl) as emu:
        await round_trip(emu, service, SqliteBackend(tmp_path), "t/mutual-tls")


async def test_mutual_tls_refuses_a_client_without_certificate(start_service: StartService, certs: Certs) -> None:
    service = await start_service(verify_peer=True)
    await assert_refused(secure(service, certs.ca))
    emu = emulator(service, free_port(), tls_options(certs))
    with pytest.raises(HookLoadError):
        await emu.start(load_timeout=1)


async def test_mutual_tls_refuses_a_certificate_signed_by_another_ca(
    start_service: StartService, certs: Certs
) -> None:
    service = await start_service(verify_peer=True)
    await assert_refused(secure(service, certs.ca, certs.other_client_cert, certs.other_client_key))
    ssl = tls_options(certs, certfile=str(certs.other_client_cert), keyfile=str(certs.other_client_key))
    emu = emulator(service, free_port(), ssl)
    with pytest.raises(HookLoadError):
        await emu.start(load_timeout=1)


async def test_mutual_tls_keeps_serving_after_refusals(start_service: StartService, certs: Certs) -> None:
    """Failed handshakes cost the listener nothing: a good client right after bad ones is served."""
    service = await start_service(verify_peer=True)
    await asyncio.gather(*(assert_refused(secure(service, certs.ca)) for _ in range(5)))
    async with secure(service, certs.ca, certs.client_cert, certs.client_key) as channel:
        assert await provider_loaded(channel) == HOOKS


def test_emulator_ssl_options_are_checked() -> None:
    with pytest.raises(ValueError, match="verify"):
        ExHookSsl.of({"enable": True, "verify": "verify_maybe"})
    with pytest.raises(ValueError, match="unknown ssl option"):
        ExHookSsl.of({"enable": True, "cacert": "x"})
    with pytest.raises(ValueError, match="go together"):
        ExHookSsl(enable=True, certfile="c.pem")
    assert ExHookSsl.of(None) == ExHookSsl() and not ExHookSsl().enable
