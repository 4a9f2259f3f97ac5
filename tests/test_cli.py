"""The console script as an operator runs it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from exhook.pb.v3 import exhook_pb2 as pb
from exhook.pb.v3 import exhook_pb2_grpc as pb_grpc
from tests.cli_run import ROOT, service_process
from tests.e2e.harness import free_port
from tests.service_proc import StderrLines


def write_config(tmp_path: Path, port: int, workers: int) -> Path:
    cfg = tmp_path / "service.hocon"
    # the HTTP port on a free loopback port too: services of parallel tests must not collide
    cfg.write_text(
        f'exhook {{ listen = "127.0.0.1:{port}", workers = {workers}, http {{ listen = "127.0.0.1:{free_port()}" }}, '
        f'emqx {{ api_key = "k", api_secret = "very-secret-value" }}, spool.path = "{tmp_path}/spool.sqlite3" }}\n'
        f'sqlite {{ enable = true, path = "{tmp_path}/db.sqlite3", topics = ["t/#"], batch_size = 10 }}\n'
    )
    return cfg


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
    with service_process(write_config(tmp_path, port, 1)) as proc:
        stderr = StderrLines(proc)
        started = stderr.wait_for("listening on", 1)
        assert f"127.0.0.1:{port}" in started and "backend sqlite" in started
        assert "very-secret-value" not in started
        assert publish_one(port) == 7  # 5 client/session hooks + message.publish, message.acked
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        out = stderr.rest()
        assert "stopped" in out and "messages_stored=1" in out


def test_workers_share_one_port(tmp_path: Path) -> None:
    port = free_port()
    with service_process(write_config(tmp_path, port, 2)) as proc:
        started = StderrLines(proc).wait_for("listening on", 2)
        assert "worker=0" in started and "worker=1" in started
        assert publish_one(port) == 7  # 5 client/session hooks + message.publish, message.acked
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_workers_that_cannot_start_stop_the_service(tmp_path: Path) -> None:
    # an unusable spool path makes the workers fail at start-up: the service exits, it does not linger
    # (an unusable store does not: the service answers and retries it, see tests/e2e/test_health.py)
    cfg = tmp_path / "broken.hocon"
    cfg.write_text(f'exhook {{ listen = "127.0.0.1:{free_port()}", workers = 2, '
                   f'http {{ listen = "127.0.0.1:{free_port()}" }}, spool.path = "/proc/self/no/such/spool" }}\n'
                   f'sqlite {{ enable = true, path = "{tmp_path}/db.sqlite3", topics = ["t/#"] }}\n')
    proc = subprocess.run([sys.executable, "-m", "exhook", "--config", str(cfg)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "exhook.spool.path" in proc.stderr


def worker_pids(parent: int) -> list[int]:
    children = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout.split()
    # the workers, not multiprocessing's resource tracker
    return [int(pid) for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]


# SIGKILL: the worker dies; SIGTERM to one worker alone: it shuts down cleanly, exit
# status 0, and the other would go on serving only the connections the kernel hands it
@pytest.mark.parametrize(("sig", "status"), [(signal.SIGKILL, -9), (signal.SIGTERM, 0)])
def test_a_worker_that_ends_unasked_stops_the_others(tmp_path: Path, sig: int, status: int) -> None:
    with service_process(write_config(tmp_path, free_port(), 2)) as proc:
        stderr = StderrLines(proc)
        stderr.wait_for("listening on", 2)
        workers = worker_pids(proc.pid)
        assert len(workers) == 2
        os.kill(workers[0], sig)
        assert proc.wait(timeout=30) != 0  # a restart policy "on failure" replaces the service
        reported = [line for line in stderr.rest().splitlines() if "exited with" in line]
        assert len(reported) == 1
        assert f"offline-exhook-0 exited with {status}; stopping the other workers" in reported[0]
        assert all(not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
                   for pid in workers)
