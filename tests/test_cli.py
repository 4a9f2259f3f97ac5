"""The console script as an operator runs it."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc

from exhook.pb.v3 import exhook_pb2 as pb
from exhook.pb.v3 import exhook_pb2_grpc as pb_grpc
from tests.e2e.harness import free_port

ROOT = Path(__file__).resolve().parent.parent


def write_config(tmp_path: Path, port: int, workers: int) -> Path:
    cfg = tmp_path / "service.hocon"
    cfg.write_text(
        f'exhook {{ listen = "127.0.0.1:{port}", workers = {workers}, '
        f'emqx {{ api_key = "k", api_secret = "very-secret-value" }} }}\n'
        f'sqlite {{ enable = true, path = "{tmp_path}/db.sqlite3", topics = ["t/#"], batch_size = 10 }}\n'
    )
    return cfg


def wait_for_lines(proc: subprocess.Popen[str], needle: str, count: int, timeout: float = 30) -> list[str]:
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    assert proc.stderr is not None
    while time.monotonic() < deadline and sum(needle in line for line in seen) < count:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
    assert sum(needle in line for line in seen) >= count, "".join(seen)
    return seen


def publish_one(port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.HookProviderStub(channel)
        loaded = stub.OnProviderLoaded(pb.ProviderLoadedRequest(), timeout=10)
        message = pb.Message(id="0" * 31 + "1", qos=1, topic="t/cli", payload=b"x", **{"from": "c"})
        answer = stub.OnMessagePublish(pb.MessagePublishRequest(message=message), timeout=10)
        assert answer.type == pb.ValuedResponse.IGNORE
        return len(loaded.hooks)


def test_service_logs_listen_address_and_backend_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "exhook", "--config", str(write_config(tmp_path, port, 1))],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        lines = wait_for_lines(proc, "listening on", 1)
        started = "".join(lines)
        assert f"127.0.0.1:{port}" in started and "backend sqlite" in started
        assert "very-secret-value" not in started
        assert publish_one(port) == 6
        proc.send_signal(signal.SIGTERM)
        out = proc.stderr.read() if proc.stderr else ""
        assert proc.wait(timeout=30) == 0
        assert "stopped" in out and "'messages_stored': 1" in out
    finally:
        proc.kill()


def test_workers_share_one_port(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "exhook", "--config", str(write_config(tmp_path, port, 2))],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        lines = wait_for_lines(proc, "listening on", 2)
        assert any("[worker 0]" in line for line in lines) and any("[worker 1]" in line for line in lines)
        assert publish_one(port) == 6
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
