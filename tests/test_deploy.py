"""The container files, checked without a Docker engine: docker-compose.yml, deploy/,
the Dockerfile and .dockerignore.

What EMQX expects was read in its source and docs (see docs/deploy.md for the sources):
environment variables ``EMQX_`` + config path with ``.`` -> ``__``, array elements by
1-based index (``EMQX_EXHOOK__SERVERS__$INDEX`` in EMQX's generated config reference),
values parsed as HOCON; ``api_key.bootstrap_file`` lines ``key:secret[:role]``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from pyhocon import ConfigFactory  # type: ignore[import-untyped]

from exhook.config import MysqlConfig, RedisConfig, SqliteConfig, load_config

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DEPLOY = ROOT / "deploy"
SERVICE = "offline-exhook"
CONFIG_DIR = "/etc/offline-exhook"  # where compose mounts deploy/

# The EMQX settings compose must give, as EMQX's config paths (emqx_exhook_schema: server
# fields name, enable, url, request_timeout, failed_action, auto_reconnect, pool_size;
# emqx_mgmt_api_key_schema: bootstrap_file), with the value EMQX must read.
EMQX_SETTINGS: dict[str, Any] = {
    "api_key.bootstrap_file": "/opt/emqx/etc/offline-exhook-api-keys.txt",
    "exhook.servers.1.name": "offline-exhook",
    "exhook.servers.1.enable": True,
    "exhook.servers.1.url": "http://offline-exhook:9000",
    "exhook.servers.1.request_timeout": "5s",
    "exhook.servers.1.failed_action": "ignore",
    "exhook.servers.1.auto_reconnect": "10s",
    "exhook.servers.1.pool_size": 8,
}
# read by the EMQX image's entrypoint script, not a config path (EMQX's Docker install guide)
EMQX_ENTRYPOINT_VARS = {"EMQX_NODE_NAME"}
# every field of exhook.servers[] (emqx_exhook_schema fields(server)) and of its ssl block
# (emqx_schema:client_ssl_opts_schema, the ones docs/deploy.md uses)
EXHOOK_SERVER_FIELDS = {"name", "enable", "url", "request_timeout", "failed_action", "ssl", "socket_options",
                        "auto_reconnect", "pool_size"}


def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict)
    return data


def service(name: str) -> dict[str, Any]:
    svc = compose()["services"][name]
    assert isinstance(svc, dict)
    return svc


def environment(name: str) -> dict[str, str]:
    env = service(name).get("environment", {})
    if isinstance(env, list):  # the KEY=VALUE list form
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v).lower() if isinstance(v, bool) else str(v) for k, v in env.items()}


def config_path_of(env_name: str) -> str:
    """EMQX's rule: drop ``EMQX_``, lower case, ``__`` -> ``.``."""
    assert env_name.startswith("EMQX_")
    return env_name[len("EMQX_"):].lower().replace("__", ".")


def hocon_value(text: str) -> Any:
    """An environment value as EMQX reads it: parsed as a HOCON value (a duration stays
    its text, as EMQX's schema converts it later)."""
    value = ConfigFactory.parse_string(f"v = {text}")["v"]
    if isinstance(value, timedelta):
        return f"{round(value.total_seconds())}s"
    return value


def config_env() -> dict[str, str]:
    """The environment the service's container gets (compose's, plus nothing else)."""
    return environment(SERVICE)


def config_file_in_compose() -> Path:
    """The host file behind the service's ``--config`` with the compose defaults applied."""
    command = service(SERVICE)["command"]
    path = command[command.index("--config") + 1]
    resolved = re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: m.group(2), path)
    assert resolved.startswith(CONFIG_DIR + "/"), resolved
    return DEPLOY / resolved[len(CONFIG_DIR) + 1:]


# ---------------------------------------------------------------------------- compose


def test_compose_parses_and_has_the_four_services_with_their_images() -> None:
    services = compose()["services"]
    assert set(services) == {"emqx", SERVICE, "mysql", "redis"}
    assert services["emqx"]["image"] == "emqx/emqx:5.10.4"
    assert services["mysql"]["image"] == "mysql:8.4.3"
    assert services["redis"]["image"] == "redis:7.4.1"
    assert services[SERVICE]["build"] == "."
    assert (ROOT / "Dockerfile").is_file()


def test_every_image_is_pinned_to_a_release() -> None:
    """A floating tag (mysql:8, redis:7, latest) changes under a deployment without a change here."""
    for name, svc in compose()["services"].items():
        if "image" in svc and "build" not in svc:
            assert re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+", svc["image"]), (name, svc["image"])


def _interpolations(text: str) -> list[tuple[str, str | None]]:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``$VAR`` (``$$`` is a literal ``$``)."""
    text = text.replace("$$", "")
    found = [(m.group(1), m.group(3)) for m in re.finditer(r"\$\{(\w+)(:?[-?](.*?))?\}", text)]
    found += [(m.group(1), None) for m in re.finditer(r"\$(\w+)", text)]
    return found


def test_every_compose_variable_is_defined() -> None:
    dotenv = ROOT / ".env"
    defined = set()
    if dotenv.is_file():
        defined = {line.split("=", 1)[0].strip() for line in dotenv.read_text().splitlines()
                   if "=" in line and not line.lstrip().startswith("#")}
    used = _interpolations(COMPOSE_FILE.read_text())
    assert used, "the backend switch OFFLINE_EXHOOK_CONFIG_FILE is a compose variable"
    for name, default in used:
        assert default or name in defined, f"${{{name}}} has neither a default nor a .env entry"
    assert ("OFFLINE_EXHOOK_CONFIG_FILE", "config.hocon") in used


def _hocon_env_refs(path: Path) -> set[str]:
    """Environment variables a HOCON file reads: ``${VAR}`` / ``${?VAR}`` in upper case
    (lower-case dotted names are references to other config paths)."""
    code = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
    return {m.group(1) for m in re.finditer(r"\$\{\??([A-Z][A-Z0-9_]*)\}", code)}


def image_env() -> dict[str, str]:
    """The ENV of the Dockerfile's final stage."""
    env: dict[str, str] = {}
    for line in _instructions(_stages()[-1], "ENV"):
        env.update(item.split("=", 1) for item in shlex.split(line))
    return env


def test_every_variable_the_deploy_config_reads_is_set_by_compose_and_none_is_unused() -> None:
    env = set(config_env())
    read = set().union(*(_hocon_env_refs(p) for p in DEPLOY.glob("*.hocon")))
    assert read, "deploy/config.hocon reads its addresses and secrets from the environment"
    optional = {"OFFLINE_EXHOOK_WORKERS", "OFFLINE_EXHOOK_LOG_LEVEL", "REDIS_PASSWORD"}  # defaults in the file
    from_image = set(image_env())
    assert read - optional <= env | from_image, f"not set by compose: {sorted(read - optional - env - from_image)}"
    # the image's own HEALTHCHECK reads OFFLINE_EXHOOK_HEALTH_URL
    assert env - {"OFFLINE_EXHOOK_HEALTH_URL"} <= read, f"set by compose but read by no config: {sorted(env - read)}"


def test_emqx_environment_names_are_real_emqx_config_paths_with_the_right_values() -> None:
    env = environment("emqx")
    config_vars = {k: v for k, v in env.items() if k not in EMQX_ENTRYPOINT_VARS}
    assert {config_path_of(k): k for k in config_vars} == {p: "EMQX_" + p.upper().replace(".", "__")
                                                         for p in EMQX_SETTINGS}
    assert set(config_vars) == {
        "EMQX_API_KEY__BOOTSTRAP_FILE",
        "EMQX_EXHOOK__SERVERS__1__NAME",
        "EMQX_EXHOOK__SERVERS__1__ENABLE",
        "EMQX_EXHOOK__SERVERS__1__URL",
        "EMQX_EXHOOK__SERVERS__1__REQUEST_TIMEOUT",
        "EMQX_EXHOOK__SERVERS__1__FAILED_ACTION",
        "EMQX_EXHOOK__SERVERS__1__AUTO_RECONNECT",
        "EMQX_EXHOOK__SERVERS__1__POOL_SIZE",
    }
    for name, raw in config_vars.items():
        path = config_path_of(name)
        if path.startswith("exhook.servers."):
            _, _, index, field = path.split(".", 3)
            assert index == "1" and field in EXHOOK_SERVER_FIELDS, path
        # EMQX parses the value as HOCON: a url or path must be quoted inside the YAML string
        assert hocon_value(raw) == EMQX_SETTINGS[path], (name, raw)
    # the service's own EMQX_API_* variables would be read by EMQX as config roots: never give them to EMQX
    assert not {k for k in env if k.startswith(("EMQX_API_URL", "EMQX_API_SECRET"))}
    assert "EMQX_API_KEY" not in env


def test_emqx_values_with_special_characters_are_quoted_for_hocon() -> None:
    """EMQX parses environment values as HOCON: a string holding ``:`` (or ``=``, ``/``...)
    must be a quoted HOCON string, e.g. ``'"localhost:1883"'``, or it changes meaning."""
    for name, raw in environment("emqx").items():
        if name in EMQX_ENTRYPOINT_VARS:
            continue
        if re.search(r"[:=/@{}\[\],#]", raw):
            assert raw.startswith('"') and raw.endswith('"'), (name, raw)


def test_exhook_url_points_at_the_service_name_and_its_grpc_port(monkeypatch: pytest.MonkeyPatch) -> None:
    url = hocon_value(environment("emqx")["EMQX_EXHOOK__SERVERS__1__URL"])
    match = re.fullmatch(r"http://([\w.-]+):(\d+)", url)
    assert match, url
    host, port = match.group(1), int(match.group(2))
    assert host == SERVICE and host in compose()["services"]
    for name, value in config_env().items():
        monkeypatch.setenv(name, value)
    for path in DEPLOY.glob("*.hocon"):
        assert load_config(path).service.listen.port == port, path


def test_api_key_bootstrap_file_matches_what_the_service_gets(monkeypatch: pytest.MonkeyPatch) -> None:
    emqx = service("emqx")
    in_container = hocon_value(environment("emqx")["EMQX_API_KEY__BOOTSTRAP_FILE"])
    mounts = {m.split(":")[1]: m.split(":")[0] for m in emqx["volumes"] if m.startswith("./")}
    host_file = ROOT / mounts[in_container]
    lines = [line for line in host_file.read_text().splitlines() if line.strip()]
    assert len(lines) == 1 and not lines[0].startswith("#"), "EMQX's bootstrap file has no comments"
    key, secret, role = lines[0].split(":")
    assert role == "administrator"  # subscribe/bulk (restoring subscriptions) needs it
    env = config_env()
    assert (env["EMQX_API_KEY"], env["EMQX_API_SECRET"]) == (key, secret)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    cfg = load_config(config_file_in_compose())
    assert (cfg.service.emqx.api_key, cfg.service.emqx.api_secret) == (key, secret)
    assert cfg.service.emqx.url == "http://emqx:18083" and "18083:18083" in emqx["ports"]


def test_deploy_configs_get_the_databases_compose_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in config_env().items():
        monkeypatch.setenv(name, value)
    mysql_env = environment("mysql")
    cfg = load_config(config_file_in_compose())
    backend = cfg.backend
    assert isinstance(backend, MysqlConfig)  # the default store
    assert (backend.server.host, backend.server.port) == ("mysql", 3306)
    assert (backend.username, backend.password, backend.database) == (
        mysql_env["MYSQL_USER"], mysql_env["MYSQL_PASSWORD"], mysql_env["MYSQL_DATABASE"])
    assert backend.init_default_schema and backend.topics
    redis = load_config(DEPLOY / "redis.hocon").backend
    assert isinstance(redis, RedisConfig)
    assert [(s.host, s.port) for s in redis.servers] == [("redis", 6379)]
    assert redis.topics == backend.topics
    assert cfg.service.http.enable and cfg.service.http.listen.port == 9001


@pytest.mark.parametrize("config_file", ["config.hocon", "redis.hocon"])
@pytest.mark.parametrize("spelling", [["--check-config", "--config"], ["check-config", "--config"]])
def test_check_config_accepts_the_deploy_config_with_the_compose_environment(
    config_file: str, spelling: list[str]
) -> None:
    exe = Path(sys.executable).with_name("offline-exhook")
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "exhook"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EMQX_", "MYSQL_", "REDIS_", "OFFLINE_"))}
    env.update(config_env())
    proc = subprocess.run([*command, *spelling, str(DEPLOY / config_file)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=60)
    if proc.returncode != 0 and spelling[0] == "check-config" and "invalid choice" in proc.stderr:
        pytest.skip("this build has no check-config subcommand")
    assert proc.returncode == 0, shlex.join(proc.args) + "\n" + proc.stderr
    assert env["EMQX_API_SECRET"] not in proc.stdout + proc.stderr  # secrets stay masked


def test_start_order_and_healthchecks() -> None:
    services = compose()["services"]
    assert services["emqx"]["depends_on"] == {SERVICE: {"condition": "service_healthy"}}
    assert services[SERVICE]["depends_on"] == {"mysql": {"condition": "service_healthy"},
                                               "redis": {"condition": "service_healthy"}}
    for name in ("emqx", "mysql", "redis"):
        assert services[name]["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL"), name
    assert "healthcheck" not in services[SERVICE]  # the image's own HEALTHCHECK applies
    assert "mysqladmin ping -h 127.0.0.1" in " ".join(services["mysql"]["healthcheck"]["test"])


def test_compose_health_is_readiness_without_emqx_so_emqx_starts_once_the_service_can_store() -> None:
    """Wrong MySQL credentials must leave the service unhealthy (EMQX waits, visibly), not loop as
    "healthy"; and EMQX's own API cannot be a condition, since EMQX starts after the service."""
    [health] = _instructions(_stages()[-1], "HEALTHCHECK")
    assert "os.environ.get('OFFLINE_EXHOOK_HEALTH_URL'" in health
    url = config_env()["OFFLINE_EXHOOK_HEALTH_URL"]
    assert url == "http://127.0.0.1:9001/readyz?exclude=emqx_api"
    assert image_env()["OFFLINE_EXHOOK_HEALTH_URL"] == "http://127.0.0.1:9001/healthz"  # plain docker run: liveness


def test_the_data_volume_holds_every_file_the_service_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    final = _stages()[-1]
    [volume] = _instructions(final, "VOLUME")
    [data] = json.loads(volume)
    mounts = {m.split(":")[1]: m.split(":")[0] for m in service(SERVICE)["volumes"]}
    assert mounts[data] in compose()["volumes"], "compose mounts a named volume at the image's VOLUME"
    for name in ("EMQX_API_SECRET", "MYSQL_PASSWORD", "OFFLINE_EXHOOK_SQLITE_PATH", "OFFLINE_EXHOOK_SPOOL_PATH"):
        monkeypatch.delenv(name, raising=False)
    for name, value in image_env().items():
        monkeypatch.setenv(name, value)
    shipped = load_config(ROOT / "config.hocon")  # as /etc/offline-exhook/config.hocon in the image
    assert isinstance(shipped.backend, SqliteConfig)
    for name, value in config_env().items():
        monkeypatch.setenv(name, value)
    paths = [shipped.backend.path, shipped.service.spool.path]
    paths += [load_config(p).service.spool.path for p in DEPLOY.glob("*.hocon")]
    for path in paths:
        assert Path(path).parent == Path(data), path


def test_the_image_installs_the_pinned_versions() -> None:
    builder = _stages()[0]
    installs = [run for run in _instructions(builder, "RUN") if "pip install" in run]
    assert installs and all(run.count("pip install -c constraints.txt") == run.count("pip install")
                            for run in installs), installs
    assert any(copy.split()[0] == "constraints.txt" for copy in _instructions(builder, "COPY"))
    pins = [line for line in (ROOT / "constraints.txt").read_text().splitlines() if line and line[0] != "#"]
    assert pins and all(re.fullmatch(r"[A-Za-z0-9_.-]+==[\w.+]+", pin) for pin in pins), pins


# ---------------------------------------------------------------------------- Dockerfile


def _stages() -> list[list[str]]:
    """The Dockerfile's instructions (continuation lines joined), split by FROM."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    stages: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def _instructions(stage: list[str], keyword: str) -> list[str]:
    return [line.split(None, 1)[1] for line in stage if line.split(None, 1)[0].upper() == keyword]


def test_dockerfile_is_multi_stage_and_the_final_stage_is_lean() -> None:
    stages = _stages()
    assert len(stages) >= 2
    builder, final = stages[0], stages[-1]
    assert " AS builder" in builder[0]
    assert "${PYTHON_IMAGE}" in final[0] and "ARG PYTHON_IMAGE=python:3.11-slim" in (ROOT / "Dockerfile").read_text()
    protoc = " ".join(_instructions(builder, "RUN"))
    assert "grpc_tools.protoc -Iexhook/pb=protos" in protoc
    assert "protos/v2/exhook.proto protos/v3/exhook.proto" in protoc
    final_text = "\n".join(final).lower()
    for tool in ("gcc", "build-essential", "apt-get install", "grpcio-tools", "pip install"):
        assert tool not in final_text, tool
    assert _instructions(final, "COPY")[0].startswith("--from=builder /opt/venv")


def test_dockerfile_runs_unprivileged_with_healthcheck_and_the_console_script() -> None:
    final = _stages()[-1]
    [user] = _instructions(final, "USER")
    assert user.split(":")[0] not in ("root", "0")
    [health] = _instructions(final, "HEALTHCHECK")
    assert "urllib.request" in health and "/healthz" in health
    assert "http://127.0.0.1:9001/healthz" in "\n".join(final)
    assert _instructions(final, "ENTRYPOINT") == ['["offline-exhook"]']
    assert _instructions(final, "CMD") == ['["--config", "/etc/offline-exhook/config.hocon"]']
    assert 'offline-exhook = "exhook.main:main"' in (ROOT / "pyproject.toml").read_text()
    assert any("/etc/offline-exhook/config.hocon" in c for c in _instructions(final, "COPY"))


def test_dockerfile_exposes_the_configured_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    [expose] = _instructions(_stages()[-1], "EXPOSE")
    exposed = {int(p) for p in expose.split()}
    for name in ("EMQX_API_SECRET", "MYSQL_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    shipped = load_config(ROOT / "config.hocon").service
    for name, value in config_env().items():
        monkeypatch.setenv(name, value)
    deployed = load_config(config_file_in_compose()).service
    for svc in (shipped, deployed):
        assert exposed == {svc.listen.port, svc.http.listen.port}
    assert f"127.0.0.1:{deployed.http.listen.port}:{deployed.http.listen.port}" in service(SERVICE)["ports"]


def test_dockerignore_keeps_the_build_context_small() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "exhook/pb", "tests", "data"} <= ignored
    # what the Dockerfile copies must stay in the context
    for needed in ("pyproject.toml", "README.md", "LICENSE", "constraints.txt", "protos", "exhook", "storage",
                   "config.hocon"):
        assert needed not in ignored
