"""The command line itself and check-config: parsing, aliases, the effective config, masked secrets."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from pyhocon import ConfigFactory  # type: ignore[import-untyped]

from exhook.cli.parser import parse_args
from exhook.config import Config, load_config, parse_config, usable_cpus
from exhook.config_fields import SECRET_FIELDS
from exhook.main import with_workers
from tests.cli_run import run_cli
from tests.e2e.harness import free_port

ROOT = Path(__file__).resolve().parent.parent
REDIS_PASSWORD = "redis-pass-Xq7"
API_SECRET = "api-secret-Zr9"
MYSQL_PASSWORD = "mysql-pass-Kw3"


def write(tmp_path: Path, text: str, name: str = "c.hocon") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def redis_config(tmp_path: Path) -> Path:
    return write(tmp_path, f"""
exhook {{
  listen = "127.0.0.1:{free_port()}"
  workers = 3
  publish_deadline = 2s
  http {{ listen = "127.0.0.1:{free_port()}" }}
  emqx {{ api_url = "http://127.0.0.1:18083", api_key = "ops", api_secret = "{API_SECRET}" }}
}}
redis {{
  enable = true
  servers = "127.0.0.1:7001,127.0.0.1:7002"
  redis_type = cluster
  password = "{REDIS_PASSWORD}"
  topics = ["a/#", "b/+"]
  batch_time = 5
  wait_timeout = 1m
}}
""")


def masked(cfg: Config) -> Config:
    """``cfg`` with every non-empty secret replaced by the mask, as check-config prints it."""

    def walk(obj: object) -> object:
        if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
            return obj
        changes: dict[str, object] = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if f.name in SECRET_FIELDS and value:
                changes[f.name] = "******"
            elif dataclasses.is_dataclass(value):
                changes[f.name] = walk(value)
        return dataclasses.replace(obj, **changes)

    result = walk(cfg)
    assert isinstance(result, Config)
    return result


# -- parsing --------------------------------------------------------------------------------------------------


def test_no_command_runs_the_service_and_old_flags_are_aliases() -> None:
    assert parse_args(["--config", "x.hocon"]).command == "run"
    assert parse_args(["--config", "x.hocon", "--workers", "3"]).workers == 3
    assert parse_args(["--check-config", "--config", "x.hocon"]).command == "check-config"
    assert parse_args(["--rebuild-topic-index"]).command == "rebuild-topic-index"
    run = parse_args(["run", "--workers", "2", "--config", "y.hocon"])
    assert (run.command, run.workers, run.config) == ("run", 2, "y.hocon")


def test_workers_0_is_one_per_cpu_and_out_of_range_counts_are_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = load_config(redis_config(tmp_path))
    assert parse_args(["run", "--workers", "0"]).workers == 0
    assert with_workers(cfg, 0).service.workers == usable_cpus()
    assert with_workers(cfg, 3).service.workers == 3
    assert with_workers(cfg, None) is cfg
    for bad in ("-1", "257", "two"):
        with pytest.raises(SystemExit) as failed:
            parse_args(["run", "--workers", bad])
        assert failed.value.code == 2
        assert "argument --workers" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["--config", "before.hocon", "messages", "--topic", "t/#"],
    ["messages", "--topic", "t/#", "--config", "before.hocon"],
])
def test_config_is_accepted_before_and_after_the_command(argv: list[str]) -> None:
    args = parse_args(argv)
    assert (args.command, args.config, args.topic, args.limit) == ("messages", "before.hocon", "t/#", 100)


def test_config_defaults_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OFFLINE_EXHOOK_CONFIG", "/etc/from-env.hocon")
    assert parse_args(["subscriptions", "c1"]).config == "/etc/from-env.hocon"
    monkeypatch.delenv("OFFLINE_EXHOOK_CONFIG")
    assert parse_args(["purge", "--topic", "a"]).config == "config.hocon"


# -- check-config ---------------------------------------------------------------------------------------------


def test_check_config_prints_every_field_with_secrets_masked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = redis_config(tmp_path)
    assert run_cli(["check-config", "--config", str(path)]) == 0
    out, err = capsys.readouterr()
    assert REDIS_PASSWORD not in out + err and API_SECRET not in out + err
    assert 'password = "******"' in out and 'api_secret = "******"' in out
    assert err.strip() == f"offline-exhook: {path} is valid (backend redis)"
    # defaults filled in, in the file's own names and units
    for line in ('publish_deadline = "2s"', 'batch_time = "5ms"', 'wait_timeout = "1m"', "pool_size = 8",
                 'message_key_prefix = "mqtt:msg"', "message_ttl = 7200", 'redis_type = "cluster"',
                 'servers = "127.0.0.1:7001,127.0.0.1:7002"', 'api_url = "http://127.0.0.1:18083"',
                 'verify = "verify_none"', "workers = 3", 'check_interval = "5s"'):
        assert line in out, line
    # the output is a config file: read back, it is the same config but for the masked secrets
    original = load_config(path)
    assert parse_config(ConfigFactory.parse_string(out)) == masked(original)


def test_check_config_json_is_the_same_tree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, f"""
exhook {{ http {{ listen = "127.0.0.1:{free_port()}" }} }}
mysql {{ enable = true, password = "{MYSQL_PASSWORD}", database = "ops", topics = ["x/#"],
         select_message_sql = "select * from mqtt_msg where topic = ${{topic}} order by id" }}
""")
    assert run_cli(["--config", str(path), "check-config", "--json"]) == 0
    out = capsys.readouterr().out
    assert MYSQL_PASSWORD not in out
    tree = json.loads(out)
    assert set(tree) == {"exhook", "mysql"}
    assert tree["mysql"]["password"] == "******"
    assert tree["mysql"]["select_message_sql"] == "select * from mqtt_msg where topic = ${topic} order by id"
    assert tree["mysql"]["server"] == "127.0.0.1:3306" and tree["mysql"]["enable"] is True
    assert tree["exhook"]["emqx"]["api_secret"] == ""  # no secret given: nothing to hide
    assert parse_config(ConfigFactory.parse_string(out)) == masked(load_config(path))


def test_old_check_config_flag_does_the_same(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = redis_config(tmp_path)
    assert run_cli(["--config", str(path), "check-config"]) == 0
    new = capsys.readouterr()
    assert run_cli(["--config", str(path), "--check-config"]) == 0
    assert capsys.readouterr() == new


@pytest.mark.parametrize(("text", "line"), [
    ("sqlite { enable = true, batch_size = 0 }",
     "offline-exhook: config error: sqlite.batch_size: must be between 1 and 10000, got 0"),
    ("redis { enable = true, pasword = x }", "offline-exhook: config error: redis.pasword: unknown field"),
    ("exhook { }", "offline-exhook: config error: redis.enable / mysql.enable / sqlite.enable: "
                   "no backend is enabled (enable exactly one)"),
])
def test_a_bad_config_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             text: str, line: str) -> None:
    path = write(tmp_path, text)
    assert run_cli(["check-config", "--config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.splitlines()) == 1 and err.startswith(line)  # unknown fields go on with the known ones


def test_a_missing_config_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["check-config", "--config", str(tmp_path / "nope.hocon")]) == 2
    assert capsys.readouterr().err == f"offline-exhook: config error: config file not found: {tmp_path}/nope.hocon\n"


def test_check_config_as_a_subprocess_never_shows_a_secret(tmp_path: Path) -> None:
    path = redis_config(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "exhook", "check-config", "--config", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert REDIS_PASSWORD not in proc.stdout + proc.stderr and API_SECRET not in proc.stdout + proc.stderr
    assert proc.stdout.startswith(f"# effective configuration of {path}")
    assert "redis {" in proc.stdout and "enable = true" in proc.stdout


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("offline-exhook 0.1.0 (python 3.") and ", grpcio 1." in out


def test_check_config_prints_the_warnings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, 'sqlite { enable = true, topics = [] }\nexhook { publish_deadline = 6s }')
    assert run_cli(["check-config", "--config", str(path)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert [line.split(":")[2].strip() for line in err[:3]] == [
        "sqlite.topics is empty",
        "exhook.publish_deadline 6s is not below exhook.emqx.hook_timeout "
        "(5s, EMQX's request_timeout for this service)",
        "exhook.emqx.api_key is empty"]
    assert all(line.startswith("offline-exhook: warning: ") for line in err[:3])
    assert err[3] == f"offline-exhook: {path} is valid (backend sqlite)"


def test_store_commands_name_the_absolute_path_of_a_relative_sqlite_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    write(etc, 'sqlite { enable = true, path = "data/store.sqlite3", topics = ["t/#"] }')
    monkeypatch.chdir(tmp_path)
    assert run_cli(["messages", "--config", "etc/c.hocon", "--topic", "t/#"]) == 2
    assert capsys.readouterr().err == f"offline-exhook: sqlite.path: no database at {etc}/data/store.sqlite3\n"
