"""With several worker processes, the parent's HTTP port adds up every worker's
metrics and reports readiness for the whole set."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
from prometheus_client.parser import text_string_to_metric_families

from exhook.pb.v3 import exhook_pb2 as pb
from exhook.pb.v3 import exhook_pb2_grpc as pb_grpc
from tests.cli_run import service_process
from tests.e2e.harness import free_port
from tests.e2e.test_outages import RedisProcess, redis_process
from tests.test_alerts import promtool

__all__ = ["redis_process"]  # a fixture used here


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


# no EMQX runs for these tests: readiness without its REST API (as compose's health check asks it)
WITHOUT_EMQX = "/readyz?exclude=emqx_api"


def wait_readyz(base: str, status: int, timeout: float = 60, path: str = WITHOUT_EMQX) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while (answer := get(f"{base}{path}"))[0] != status:
        assert time.monotonic() < deadline, answer
        time.sleep(0.1)
    body: dict[str, str] = json.loads(answer[1])
    return body


def wait_ready(base: str, timeout: float = 60) -> None:
    wait_readyz(base, 200, timeout)


def publish(port: int, connections: int, per_connection: int) -> None:
    """Each channel is its own TCP connection, so the kernel spreads them over the workers."""
    for c in range(connections):
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
            stub = pb_grpc.HookProviderStub(ch)
            for i in range(per_connection):
                msg = pb.Message(node="emqx@127.0.0.1", id=f"{c:016X}{i:016X}", qos=1, topic="t/w",
                                 payload=b"x", timestamp=int(time.time() * 1000))
                setattr(msg, "from", "pub")
                stub.OnMessagePublish(pb.MessagePublishRequest(message=msg), timeout=10)


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def two_workers_config(tmp_path: Path, backend: str) -> tuple[Path, int, str]:
    """A config of two workers over ``backend`` (a HOCON block); with its gRPC port and HTTP base URL."""
    grpc_port, http_port, no_emqx = free_port(), free_port(), free_port()
    cfg = tmp_path / "workers.hocon"
    cfg.write_text(
        f'exhook {{ listen = "127.0.0.1:{grpc_port}", workers = 2, log_format = json,\n'
        f'  emqx {{ api_url = "http://127.0.0.1:{no_emqx}" }}\n'
        f'  http {{ listen = "127.0.0.1:{http_port}", check_interval = 200ms }}, spool.path = "{tmp_path}/spool" }}\n'
        f'{backend}\n')
    return cfg, grpc_port, f"http://127.0.0.1:{http_port}"


def test_parent_serves_summed_metrics_and_readiness(tmp_path: Path) -> None:
    cfg, grpc_port, base = two_workers_config(
        tmp_path, f'sqlite {{ enable = true, path = "{tmp_path}/db.sqlite3", topics = ["t/#"], batch_size = 10 }}')
    with service_process(cfg) as proc:
        wait_ready(base)
        status, body = get(f"{base}{WITHOUT_EMQX}")
        assert (status, json.loads(body)) == (200, {"status": "ready", "backend": "sqlite"})
        assert get(f"{base}/healthz") == (200, b'{"status": "up"}')
        # all of readiness: each worker says that EMQX's API is not there (once each has
        # asked it: a worker that started later may not have yet)
        reasons = both_report(base, ": unreachable at ", path="/readyz")
        assert {who: why.split(": unreachable at ")[0] for who, why in reasons.items()} == {
            "0": "emqx_api", "1": "emqx_api"}

        publish(grpc_port, connections=8, per_connection=5)
        status, body = get(f"{base}/metrics")
        assert status == 200
        metrics = samples(body.decode())
        # the summed exposition of the parent passes promtool's lint as a single process's does
        lint = promtool("check", "metrics", stdin=body.decode())
        assert lint.returncode == 0, lint.stdout + lint.stderr
        assert metrics[("offline_exhook_messages_stored_total", frozenset())] == 40
        assert metrics[("offline_exhook_hook_calls_total", frozenset({("hook", "message.publish")}))] == 40
        assert metrics[("offline_exhook_publish_duration_seconds_count", frozenset())] == 40
        assert metrics[("offline_exhook_backend_up", frozenset())] == 1
        assert metrics[("offline_exhook_emqx_api_up", frozenset())] == 0
        # process metrics of the supervisor and of each worker, from /proc
        for process in ("supervisor", "worker-0", "worker-1"):
            assert metrics[("process_resident_memory_bytes", frozenset({("process", process)}))] > 0
            assert metrics[("process_open_fds", frozenset({("process", process)}))] > 0

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        _, stderr = proc.communicate(timeout=5)
        started = [json.loads(line) for line in stderr.splitlines() if line.startswith("{") and "listening on" in line]
        assert sorted(entry["worker"] for entry in started) == [0, 1]


def worker_reasons(body: dict[str, str]) -> dict[str, str]:
    """``worker 0: why; worker 1: why`` as {"0": why, "1": why}."""
    pairs = (part.split(": ", 1) for part in body["reason"].split("; "))
    return {who.removeprefix("worker "): why for who, why in pairs}


def both_report(base: str, text: str, path: str = WITHOUT_EMQX) -> dict[str, str]:
    """The parent's readiness reasons once both workers report ``text`` (each worker
    reports in its own time)."""
    deadline = time.monotonic() + 60
    while True:
        body = wait_readyz(base, 503, path=path)
        reasons = worker_reasons(body)
        if set(reasons) == {"0", "1"} and all(text in why for why in reasons.values()):
            return reasons
        assert time.monotonic() < deadline, body
        time.sleep(0.1)


def test_parent_readiness_names_each_worker_and_its_reason(tmp_path: Path, redis_process: RedisProcess) -> None:
    cfg, _, base = two_workers_config(
        tmp_path, f'redis {{ enable = true, servers = "127.0.0.1:{redis_process.port}", topics = ["t/#"] }}')
    with service_process(cfg, stderr=subprocess.DEVNULL) as proc:
        # Redis is not running yet: each worker says why it is not ready
        reasons = both_report(base, "redis is not connected yet (")
        assert all(str(redis_process.port) in why for why in reasons.values())
        redis_process.start()
        wait_ready(base)
        assert json.loads(get(f"{base}{WITHOUT_EMQX}")[1]) == {"status": "ready", "backend": "redis"}
        redis_process.kill()
        reasons = both_report(base, "redis unreachable: ")
        assert all("redis is not connected yet" not in why for why in reasons.values())
        redis_process.start()
        wait_ready(base)

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
