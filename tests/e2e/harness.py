"""Runs the real service in-process against the EMQX emulator."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from exhook.config import Config, HostPort, load_config_string
from exhook.server import Service
from tests.e2e.backends import BackendUnderTest
from tests.emulator import EmqxEmulator, EmuClient
from tests.ports import free_port

API_KEY = "offline-exhook"
API_SECRET = "e2e-secret"
TOPICS = ["t/#", "w/#", "s/#", "o/#", "x/+/y"]


@dataclass
class Harness:
    backend: BackendUnderTest
    version: str
    message_ttl: int = 0
    batch_size: int = 10
    batch_time_ms: int = 5
    publish_deadline: str = "500ms"
    extra_hocon: str = ""
    request_timeout: float = 5.0
    api_role: str = "administrator"  # of the API key the emulated EMQX gives the service
    # the broker played: EMQX 5.3.2 for v2 (no peer port), 5.10.4 for v3 (tests/emulator)
    emqx_version: str | None = None
    rest_port: int = field(default_factory=free_port)
    grpc_port: int = field(default_factory=free_port)
    services: list[Service] = field(default_factory=list)
    emu: EmqxEmulator | None = None
    spool_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="ox-spool-")))

    def config(self, port: int | None = None) -> Config:
        text = "\n".join([
            self.backend.hocon(TOPICS, self.message_ttl, self.batch_size),
            # HOCON merges this into the backend's block
            f"{self.backend.name} {{ batch_time = {self.batch_time_ms} }}",
            "exhook {",
            f'  publish_deadline = {self.publish_deadline}, replay_batch_size = 7, log_level = debug',
            '  http { check_interval = 200ms }',
            # the service is told the emulated broker's hook timeout, as an operator tells it EMQX's
            f'  emqx {{ api_url = "http://127.0.0.1:{self.rest_port}", api_key = "{API_KEY}", '
            f'api_secret = "{API_SECRET}", request_timeout = 5s, '
            f'hook_timeout = {round(self.request_timeout * 1000)}ms }}',
            "}",
            # one spool per gRPC port: a restart on the same port takes over what the last run spooled
            f'exhook.spool.path = "{self.spool_dir}/spool-{self.grpc_port if port is None else port}.sqlite3"',
            self.extra_hocon,
        ])
        cfg = load_config_string(text)
        listen = HostPort("127.0.0.1", self.grpc_port if port is None else port)
        # port 0: the OS picks a free one when the server binds (no race with other sockets)
        http = dataclasses.replace(cfg.service.http, listen=HostPort("127.0.0.1", 0))
        return dataclasses.replace(cfg, service=dataclasses.replace(cfg.service, listen=listen, workers=1, http=http))

    @property
    def service(self) -> Service:
        return self.services[0]

    async def start_service(self, port: int | None = None) -> Service:
        service = Service(self.config(port))
        await service.start()
        self.services.append(service)
        return service

    async def start(self) -> None:
        await self.backend.setup()
        await self.start_service()
        self.emu = EmqxEmulator(f"127.0.0.1:{self.grpc_port}", self.version, api_key=API_KEY,
                                api_secret=API_SECRET, api_role=self.api_role, rest_port=self.rest_port, pool_size=4,
                                request_timeout=self.request_timeout, emqx_version=self.emqx_version)
        await self.emu.start()

    async def restart_service(self) -> Service:
        """Stop the running instance and start a fresh one on the same port (all its
        memory is gone; only the store remains)."""
        old = self.services.pop(0)
        await old.stop()
        return await self.start_service()

    def client(self, clientid: str, **kwargs: object) -> EmuClient:
        assert self.emu is not None
        return self.emu.client(clientid, **kwargs)  # type: ignore[arg-type]

    async def settle(self, max_rounds: int = 50) -> None:
        """Wait until broker and service are quiet: replays trigger publishes, which
        trigger deliveries, acks and writes, so go round (the broker quiet, then every
        service idle) until a whole round saw no new hook call nor REST request."""
        assert self.emu is not None
        for _ in range(max_rounds):
            seen = self._activity()
            await self.emu.settle()
            for service in self.services:
                await service.idle()
            if self._activity() == seen:
                return
        raise TimeoutError(f"broker and service still busy after {max_rounds} rounds")

    def _activity(self) -> tuple[int, int]:
        assert self.emu is not None
        return len(self.emu.hooks.calls), len(self.emu.rest_requests)

    async def stop(self) -> None:
        if self.emu is not None:
            await self.emu.stop()
        for service in self.services:
            await service.stop()
        await self.backend.teardown()
        shutil.rmtree(self.spool_dir, ignore_errors=True)

    def bulk_items(self) -> list[dict[str, object]]:
        """Every item the service published through publish/bulk, in order."""
        assert self.emu is not None
        return [item for body in self.emu.rest_bodies("/publish/bulk") for item in body]
