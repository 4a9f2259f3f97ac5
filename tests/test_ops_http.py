"""The operator HTTP port: start-up failures, and switched off."""

from __future__ import annotations

import dataclasses
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp

from exhook.config import HostPort, load_config_string
from exhook.server import Service
from tests.e2e.harness import free_port

ROOT = Path(__file__).resolve().parent.parent


def test_http_port_in_use_stops_start_up_with_one_line_naming_the_field(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = tmp_path / "c.hocon"
        cfg.write_text(f'exhook {{ listen = "127.0.0.1:{free_port()}", workers = 1, '
                       f'http {{ listen = "127.0.0.1:{port}" }}, spool.path = "{tmp_path}/spool" }}\n'
                       f'sqlite {{ enable = true, path = "{tmp_path}/db.sqlite3", topics = ["t/#"] }}\n')
        done = subprocess.run([sys.executable, "-m", "exhook", "--config", str(cfg)], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    failures = [line for line in done.stderr.splitlines() if "level=critical" in line]
    assert len(failures) == 1
    assert f'msg="exhook.http.listen: cannot listen on 127.0.0.1:{port}' in failures[0]
    assert "Traceback" not in done.stderr


async def test_http_disabled_opens_no_port_and_interval_reaches_readiness(tmp_path: Path) -> None:
    http_port = free_port()
    cfg = load_config_string(
        f'exhook {{ listen = "127.0.0.1:{free_port()}", http {{ enable = false, listen = "127.0.0.1:{http_port}", '
        f'check_interval = 750ms }} }}\n'
        f'sqlite {{ enable = true, path = "{tmp_path}/db.sqlite3", topics = ["t/#"] }}\n')
    assert cfg.service.http == dataclasses.replace(cfg.service.http, enable=False, check_interval_ms=750,
                                                   listen=HostPort("127.0.0.1", http_port))
    service = Service(cfg)
    await service.start()
    try:
        assert service.http is None
        assert service.readiness is not None
        # ready but for EMQX's API, which no test server provides here
        assert service.readiness.failing(exclude={"emqx_api"}) == []
        assert service.readiness.interval_s == 0.75
        async with aiohttp.ClientSession() as session:
            try:
                async with session.get(f"http://127.0.0.1:{http_port}/healthz") as resp:
                    raise AssertionError(f"something answered on the disabled port: {resp.status}")
            except aiohttp.ClientConnectionError:
                pass
    finally:
        await service.stop()
