"""monitoring/alerts.yml: valid for Prometheus, unit-tested, about metrics that exist;
and the service's real /metrics passes promtool's own lint."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from pathlib import Path

import aiohttp
import yaml
from prometheus_client.parser import text_string_to_metric_families

from exhook.config import HostPort, load_config_string
from exhook.hooks import HOOKS_CLIENT, HOOKS_MESSAGE
from exhook.server import Service
from tests.e2e.harness import free_port
from tests.test_dashboard import exposed

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "monitoring"
METRIC = re.compile(r"\b(?:offline_exhook_|process_)[a-z_]+")


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    assert exe, "promtool is missing: `make test` installs it (Debian package prometheus, scripts/start-services.sh)"
    return subprocess.run([exe, *args], cwd=MONITORING, input=stdin, capture_output=True, text=True, timeout=60)


def rules() -> list[dict[str, object]]:
    groups = yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_promtool_accepts_the_rules() -> None:
    done = promtool("check", "rules", "alerts.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules())} rules found" in done.stdout


def test_promtool_unit_tests_of_the_rules_pass() -> None:
    done = promtool("test", "rules", "alerts-test.yml")
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_is_unit_tested_and_queries_exposed_metrics() -> None:
    tests = yaml.safe_load((MONITORING / "alerts-test.yml").read_text())["tests"]
    tested = {case["alertname"] for test in tests for case in test["alert_rule_test"] if case["exp_alerts"]}
    names = exposed()
    for rule in rules():
        assert rule["alert"] in tested, f"{rule['alert']} never fires in alerts-test.yml"
        used = METRIC.findall(str(rule["expr"]))
        assert used and all(name in names for name in used), (rule["alert"], used)


def test_the_metrics_the_issue_names_are_alerted_on() -> None:
    used = {names for rule in rules() for names in METRIC.findall(str(rule["expr"]))}
    assert {"offline_exhook_backend_up", "offline_exhook_emqx_api_up", "offline_exhook_replay_failures_total",
            "offline_exhook_spool_bytes", "offline_exhook_spool_pending", "offline_exhook_pending_writes",
            "offline_exhook_publish_deadline_answers_total", "offline_exhook_writes_rejected_total",
            "offline_exhook_requests_rejected_total", "offline_exhook_loop_restarts_total"} <= used


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to dashes."""
    headings = re.findall(r"^#+ (.+)$", markdown, re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_each_alert_links_a_section_of_the_operators_guide() -> None:
    anchors = _anchors((ROOT / "docs" / "operate.md").read_text())
    for rule in rules():
        annotations = rule["annotations"]
        assert isinstance(annotations, dict)
        page, _, anchor = annotations["runbook"].partition("#")
        assert page == "docs/operate.md" and anchor in anchors, (rule["alert"], anchor)


async def test_the_real_metrics_pass_promtool_lint(tmp_path: Path) -> None:
    cfg = load_config_string(f'exhook {{ listen = "127.0.0.1:{free_port()}" }}\n'
                             f'sqlite {{ enable = true, path = "{tmp_path}/db.sqlite3", topics = ["t/#"] }}\n')
    cfg = dataclasses.replace(cfg, service=dataclasses.replace(
        cfg.service, http=dataclasses.replace(cfg.service.http, listen=HostPort("127.0.0.1", 0))))
    service = Service(cfg)
    await service.start()
    try:
        assert service.http is not None
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{service.http.port}/metrics") as resp:
                text = await resp.text()
    finally:
        await service.stop()
    done = promtool("check", "metrics", stdin=text)
    assert done.returncode == 0, done.stdout + done.stderr
    families = {f.name: f for f in text_string_to_metric_families(text)}
    # hook counters: provider.loaded and the hooks the service registers, nothing else until called
    hooks = {s.labels["hook"] for s in families["offline_exhook_hook_calls"].samples}
    assert hooks == {"provider.loaded", *HOOKS_CLIENT, *HOOKS_MESSAGE}
    [build] = families["offline_exhook_build_info"].samples
    assert build.value == 1 and build.labels["version"] == "0.1.0"
    assert set(build.labels) == {"version", "python", "grpc"}
    for name in ("process_resident_memory_bytes", "process_open_fds", "process_cpu_seconds"):
        assert families[name].samples[0].value > 0, name
    [api_up] = families["offline_exhook_emqx_api_up"].samples
    assert api_up.value == 0  # no EMQX here
