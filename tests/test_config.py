"""Config parsing: every documented error is one line naming the field."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from exhook.config import (
    ConfigError,
    MysqlConfig,
    RedisConfig,
    SqliteConfig,
    load_config,
    load_config_string,
)
from exhook.config_checks import config_warnings
from tests.redis_servers import TlsMaterial, make_tls_material

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('redis { enable = true, redis_type = "clustr" }', "redis.redis_type"),
        ('redis { enable = true, topics = ["a/#/b"] }', "redis.topics"),
        ('redis { enable = true, topics = ["a/b+"] }', "redis.topics"),
        ('redis { enable = true, servers = "localhost:99999" }', "redis.servers"),
        ('redis { enable = true, servers = "a:1,b:2" }', "redis.servers"),
        ('redis { enable = true, redis_type = sentinel, servers = "a:1" }', "redis.sentinel"),
        ('mysql { enable = true, server = "db:" }', "mysql.server"),
        ('mysql { enable = true, server = "db:x" }', "mysql.server"),
        ('mysql { enable = true, pool_size = 0 }', "mysql.pool_size"),
        ('mysql { enable = true, delete_message_sql = "delete from t where a = ${nope}" }',
         "mysql.delete_message_sql"),
        ('redis { enable = true }\nmysql { enable = true }', "redis.enable / mysql.enable"),
        ("exhook { log_level = info }", "no backend is enabled"),
        ('sqlite { enable = true, pathh = "x" }', "sqlite.pathh"),
        ('sqlite { enable = true, batch_time = "soon" }', "sqlite.batch_time"),
        ('sqlite { enable = true }\nexhook { listen = "0.0.0.0:70000" }', "exhook.listen"),
        ('sqlite { enable = true }\nexhook { log_level = loud }', "exhook.log_level"),
        ('sqlite { enable = true }\nexhook { emqx { api_url = "localhost" } }', "exhook.emqx.api_url"),
        ('sqlite { enable = true }\nexhook { emqx { hook_timeout = 0s } }', "exhook.emqx.hook_timeout"),
        ('sqlite { enable = true }\nexhook { emqx { hook_timeout = soon } }', "exhook.emqx.hook_timeout"),
        ('redis { enable = true, ssl { enable = true, cacertfile = "/nonexistent/ca.pem" } }',
         "redis.ssl.cacertfile"),
        ('redis { enable = true, ssl { verfy = true } }', "redis.ssl.verfy"),
        ('sqlite { enable = true }\nexhook { log_format = xml }', "exhook.log_format"),
        ('sqlite { enable = true }\nexhook { http { listen = "host:0" } }', "exhook.http.listen"),
        ('sqlite { enable = true }\nexhook { http { check_interval = 10ms } }', "exhook.http.check_interval"),
        ('sqlite { enable = true }\nexhook { http { enable = maybe } }', "exhook.http.enable"),
        ('sqlite { enable = true }\nexhook { http { port = 9001 } }', "exhook.http.port"),
        ('sqlite { enable = true, path = "a\x00b" }', "sqlite.path: contains a NUL character"),
        ('sqlite { enable = true }\nexhook { spool { path = "a\x00b" } }', "exhook.spool.path: contains a NUL"),
        # the stores cannot expire that far out (Redis refused every write, SQLite's reads overflowed)
        ('redis { enable = true, message_ttl = "999999999999d" }', "redis.message_ttl: must be at most"),
    ],
)
def test_config_errors_name_the_field(text: str, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config_string(text)
    message = str(err.value)
    assert field in message
    assert "\n" not in message


def test_shipped_config_enables_sqlite() -> None:
    cfg = load_config(ROOT / "config.hocon")
    assert isinstance(cfg.backend, SqliteConfig)
    assert cfg.backend.topics == ("offline/#",)
    assert cfg.service.publish_deadline_ms == 500
    assert cfg.service.listen.port == 9000
    assert (cfg.service.log_format, cfg.service.http.enable, cfg.service.http.listen.port) == ("text", True, 9001)
    assert cfg.service.http.check_interval_ms == 5000 and not cfg.service.ssl.enable


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to tell them from one")
def test_shipped_config_runs_one_worker_per_cpu_the_process_may_use(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OFFLINE_EXHOOK_WORKERS", raising=False)
    allowed = os.sched_getaffinity(0)
    assert load_config(ROOT / "config.hocon").service.workers == len(allowed)
    os.sched_setaffinity(0, {min(allowed)})  # as under taskset or a container's cpuset
    try:
        assert load_config(ROOT / "config.hocon").service.workers == 1
    finally:
        os.sched_setaffinity(0, allowed)


def test_plugin_fields_and_defaults() -> None:
    cfg = load_config_string(
        """
        redis {
          enable = true, servers = "r1:26379, r2:26379", redis_type = sentinel, sentinel = mymaster
          pool_size = 3, username = u, password = p, database = 2, topics = ["t/#", "x/+/y"]
          message_key_prefix = "a:msg", subscription_key_prefix = "a:sub", message_ttl = 60
          batch_size = 50, batch_time = 20
          ssl { enable = true, verify = verify_none, server_name_indication = "redis.local" }
        }
        """
    )
    r = cfg.backend
    assert isinstance(r, RedisConfig)
    assert [str(s) for s in r.servers] == ["r1:26379", "r2:26379"]
    assert (r.redis_type, r.sentinel, r.pool_size, r.database) == ("sentinel", "mymaster", 3, 2)
    assert (r.username, r.password, r.message_ttl, r.batch_size, r.batch_time_ms) == ("u", "p", 60, 50, 20)
    assert r.topics == ("t/#", "x/+/y")
    assert r.ssl.enable and not r.ssl.verify and r.ssl.server_name_indication == "redis.local"
    assert "password='p'" not in repr(r)


def test_mysql_defaults_are_the_plugin_templates() -> None:
    cfg = load_config_string("mysql { enable = true, topics = [\"t/#\"] }")
    m = cfg.backend
    assert isinstance(m, MysqlConfig)
    assert "${flags.retain}" in m.sql["insert_message_sql"]
    assert m.sql["select_subscriptions_sql"] == "select topic, qos from mqtt_sub where clientid = ${clientid}"
    assert (m.batch_size, m.batch_time_ms, m.message_ttl, m.init_default_schema) == (1, 100, 0, False)


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMQX_API_SECRET", "s3cret")
    monkeypatch.setenv("OFFLINE_EXHOOK_LISTEN", "127.0.0.1:9911")
    cfg = load_config(ROOT / "config.hocon")
    assert cfg.service.emqx.api_secret == "s3cret"
    assert str(cfg.service.listen) == "127.0.0.1:9911"
    assert "s3cret" not in repr(cfg)


def test_durations_accept_units() -> None:
    cfg = load_config_string('sqlite { enable = true, batch_time = "2s" }\nexhook { publish_deadline = 250ms }')
    assert cfg.backend.batch_time_ms == 2000
    assert cfg.service.publish_deadline_ms == 250
    assert (cfg.service.emqx.request_timeout_ms, cfg.service.emqx.hook_timeout_ms) == (5000, 5000)  # EMQX's
    cfg = load_config_string("sqlite { enable = true }\nexhook.emqx { request_timeout = 2s, hook_timeout = 1500ms }")
    assert (cfg.service.emqx.request_timeout_ms, cfg.service.emqx.hook_timeout_ms) == (2000, 1500)


def test_replay_rekey_hold_defaults_to_a_second_and_may_be_off() -> None:
    assert load_config_string("sqlite { enable = true }").service.replay_rekey_hold_ms == 1000
    off = load_config_string("sqlite { enable = true }\nexhook { replay_rekey_hold = 0 }")
    assert off.service.replay_rekey_hold_ms == 0


def test_bad_config_exits_non_zero_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.hocon"
    bad.write_text('redis { enable = true, redis_type = "nope" }\n')
    proc = subprocess.run([sys.executable, "-m", "exhook", "--config", str(bad)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "redis.redis_type" in lines[0]


# --- exhook.ssl: TLS on the gRPC listener ------------------------------------


def _listener_tls(block: str) -> str:
    return f'sqlite {{ enable = true }}\nexhook {{ ssl {{ {block} }} }}'


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsMaterial:
    return make_tls_material(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def pem_files(tls_files: TlsMaterial, tmp_path: Path) -> dict[str, Path]:
    """The listener's files (parsing loads them), copied so that a test may change them,
    and one that is not PEM."""
    files = {"cert": tls_files.server_cert, "key": tls_files.server_key, "ca": tls_files.ca_cert}
    copies = {name: tmp_path / f"{name}.pem" for name in files}
    for name, path in copies.items():
        path.write_bytes(files[name].read_bytes())
    copies["garbage"] = tmp_path / "garbage.pem"
    copies["garbage"].write_text("-----BEGIN PLACEHOLDER-----\n")
    return copies


def test_exhook_ssl_is_off_by_default_and_parses_when_complete(pem_files: dict[str, Path]) -> None:
    assert not load_config_string("sqlite { enable = true }").service.ssl.enable
    cfg = load_config_string(_listener_tls(
        f'enable = true, certfile = "{pem_files["cert"]}", keyfile = "{pem_files["key"]}", '
        f'cacertfile = "{pem_files["ca"]}", verify = verify_peer'))
    tls = cfg.service.ssl
    assert (tls.enable, tls.verify_peer) == (True, True)
    assert (tls.certfile, tls.keyfile, tls.cacertfile) == tuple(str(pem_files[n]) for n in ("cert", "key", "ca"))
    server_only = load_config_string(_listener_tls(
        f'enable = true, certfile = "{pem_files["cert"]}", keyfile = "{pem_files["key"]}"'))
    assert server_only.service.ssl.enable and not server_only.service.ssl.verify_peer


@pytest.mark.parametrize(
    ("block", "field", "words"),
    [
        ('enable = true, keyfile = "{key}"', "exhook.ssl.certfile", "required"),
        ('enable = true, certfile = "{cert}"', "exhook.ssl.keyfile", "required"),
        ('enable = true, certfile = "{cert}", keyfile = "{key}", verify = verify_peer',
         "exhook.ssl.cacertfile", "verify_peer"),
        ('enable = true, certfile = "{cert}", keyfile = "{key}", verify = verify_always',
         "exhook.ssl.verify", "verify_peer or verify_none"),
        ('enable = true, certfile = "{missing}", keyfile = "{key}"', "exhook.ssl.certfile", "file not found"),
        ('enable = true, certfile = "{cert}", keyfile = "{missing}"', "exhook.ssl.keyfile", "file not found"),
        ('enable = true, certfile = "{cert}", keyfile = "{key}", cacertfile = "{missing}", verify = verify_peer',
         "exhook.ssl.cacertfile", "file not found"),
        ('enable = true, certfile = "{cert}", keyfile = "{key}", server_name_indication = x',
         "exhook.ssl.server_name_indication", "unknown field"),
        # there, but not a certificate and key: grpc alone would fail to bind, naming no field
        ('enable = true, certfile = "{garbage}", keyfile = "{key}"', "exhook.ssl.certfile", "cannot load"),
        ('enable = true, certfile = "{cert}", keyfile = "{garbage}"', "exhook.ssl.certfile", "cannot load"),
        ('enable = true, certfile = "{cert}", keyfile = "{key}", cacertfile = "{garbage}", verify = verify_peer',
         "exhook.ssl.cacertfile", "cannot load"),
    ],
)
def test_exhook_ssl_errors_name_the_field(
    pem_files: dict[str, Path], tmp_path: Path, block: str, field: str, words: str
) -> None:
    text = _listener_tls(block.format(cert=pem_files["cert"], key=pem_files["key"], ca=pem_files["ca"],
                                      garbage=pem_files["garbage"], missing=tmp_path / "nowhere.pem"))
    with pytest.raises(ConfigError) as err:
        load_config_string(text)
    message = str(err.value)
    assert message.startswith(field) and words in message and "\n" not in message, message


def test_exhook_ssl_disabled_ignores_missing_files(tmp_path: Path) -> None:
    cfg = load_config_string(_listener_tls(f'enable = false, certfile = "{tmp_path / "nowhere.pem"}"'))
    assert not cfg.service.ssl.enable


# --- issue 13: the listed cases, one line each naming the field ------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('sqlite { enable = true, topics = [""] }',
         'sqlite.topics: "" is not a topic filter (an empty list, not an empty filter, makes the backend inactive)'),
        ('redis { enable = true, topics = ["a/#", ""] }', 'redis.topics: "" is not a topic filter'),
        ('mysql { enable = true, topics = [\n  "a/#"\n  ""\n] }', 'mysql.topics: "" is not a topic filter'),
        ('sqlite { enable = true, topics = ["$share/g/a/#"] }',
         "sqlite.topics: '$share/g/a/#' is a shared subscription, not a topic filter"),
        ('sqlite { enable = true, topics = ["$queue/a"] }', "sqlite.topics: '$queue/a' is a shared subscription"),
        ('sqlite { enable = true, batch_size = 0 }', "sqlite.batch_size: must be between 1 and 10000, got 0"),
        ('sqlite { enable = true }\nexhook { replay_batch_size = 10001 }',
         "exhook.replay_batch_size: must be between 1 and 10000, got 10001"),
        ('sqlite { enable = true }\nexhook { max_pending_writes = 0 }',
         "exhook.max_pending_writes: must be at least 1, got 0"),
        ('sqlite { enable = true }\nexhook { listen = "nohostport" }',
         "exhook.listen: expected host:port such as 0.0.0.0:9000, got 'nohostport' (no port)"),
        ('sqlite { enable = true }\nexhook { http { listen = "localhost" } }',
         "exhook.http.listen: expected host:port"),
        ('sqlite { enable = true }\nexhook { listen = "127.0.0.1:9000", http { listen = "127.0.0.1:9000" } }',
         "exhook.http.listen: 127.0.0.1:9000 takes the port of exhook.listen (127.0.0.1:9000)"),
        ('sqlite { enable = true }\nexhook { listen = "127.0.0.1:9000", http { listen = "0.0.0.0:9000" } }',
         "exhook.http.listen: 0.0.0.0:9000 takes the port of exhook.listen"),
        ('sqlite { enable = true, message_ttl = 1500ms }', 'sqlite.message_ttl: expected whole seconds, got 1500ms'),
        ('sqlite { enable = true, message_ttl = "soon" }',
         'sqlite.message_ttl: expected a duration such as 500ms, 1.5s, 1m30s, 2h, 1d, got "soon"'),
        ('sqlite { enable = true }\nexhook { publish_deadline = 0 }',
         "exhook.publish_deadline: must be at least 1ms, got 0ms"),
        ('sqlite { enable = true }\nexhook { replay_rekey_hold = 11s }',
         "exhook.replay_rekey_hold: must be at most 10s, got 11s"),
        ('sqlite { enable = true }\nexhook { spool { max_bytes = "12XB" } }',
         'exhook.spool.max_bytes: expected a size such as 1048576, 64MB, 1GiB, got "12XB"'),
        ('sqlite { enable = true }\nexhook { spool { max_bytes = 1000 } }',
         "exhook.spool.max_bytes: must be at least 1048576 bytes, got 1000"),
        ('sqlite { enable = true, path = "/" }', "sqlite.path: / is a directory, not a database file"),
        ('sqlite { enable = true, path = "/etc/hostname/x.sqlite3" }',
         "sqlite.path: cannot create /etc/hostname/x.sqlite3: /etc/hostname is not a directory"),
        ('sqlite { enable = true }\nexhook { spool { path = "/" } }', "exhook.spool.path: / is a directory"),
    ],
)
def test_listed_config_mistakes_are_one_line_naming_the_field(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config_string(text)
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value) and "timedelta" not in str(err.value)


def test_the_http_port_may_equal_the_grpc_port_when_it_is_off() -> None:
    cfg = load_config_string('sqlite { enable = true }\nexhook { listen = "127.0.0.1:9000", '
                             'http { enable = false, listen = "127.0.0.1:9000" } }')
    assert not cfg.service.http.enable


@pytest.mark.parametrize(
    ("deadline", "ms"), [('"1h"', 3_600_000), ('"1.5s"', 1500), ("1m30s", 90_000), ("1.5s", 1500), ("750", 750)])
def test_publish_deadline_takes_what_emqx_takes(deadline: str, ms: int) -> None:
    assert load_config_string(f"sqlite {{ enable = true }}\nexhook {{ publish_deadline = {deadline} }}"
                              ).service.publish_deadline_ms == ms


def test_message_ttl_in_hours_is_seconds() -> None:
    cfg = load_config_string('redis { enable = true, message_ttl = 2h, wait_timeout = 1.5s, batch_time = "1m" }')
    assert isinstance(cfg.backend, RedisConfig)
    assert (cfg.backend.message_ttl, cfg.backend.wait_timeout_ms, cfg.backend.batch_time_ms) == (7200, 1500, 60_000)
    assert load_config_string("sqlite { enable = true, message_ttl = 600 }").backend.message_ttl == 600


def test_spool_size_counts_as_emqx_does() -> None:
    cfg = load_config_string('sqlite { enable = true }\nexhook { spool { max_bytes = 64MB } }')
    assert cfg.service.spool.max_bytes == 64 * 1024 * 1024


def test_relative_paths_are_relative_to_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pem_files: dict[str, Path]
) -> None:
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    for name, pem in pem_files.items():
        (conf_dir / f"{name}.pem").write_bytes(pem.read_bytes())
    (conf_dir / "c.hocon").write_text(
        'sqlite { enable = true, path = "data/store.sqlite3", topics = ["t/#"] }\n'
        'exhook { spool { path = "../spool/spool.sqlite3" },\n'
        '  ssl { enable = true, certfile = "cert.pem", keyfile = "./key.pem", cacertfile = "ca.pem", '
        'verify = verify_peer } }\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config("../etc/c.hocon")
    assert isinstance(cfg.backend, SqliteConfig)
    assert cfg.backend.path == str(conf_dir / "data" / "store.sqlite3")
    assert cfg.service.spool.path == str(tmp_path / "spool" / "spool.sqlite3")
    ssl = cfg.service.ssl
    assert (ssl.certfile, ssl.keyfile) == (str(conf_dir / "cert.pem"), str(conf_dir / "key.pem"))
    # and an error names the absolute path it looked at
    (conf_dir / "ca.pem").unlink()
    with pytest.raises(ConfigError, match=f"exhook.ssl.cacertfile: file not found: {conf_dir / 'ca.pem'}$"):
        load_config("../etc/c.hocon")
    with pytest.raises(ConfigError, match=f"^config file not found: {tmp_path / 'etc' / 'missing.hocon'}$"):
        load_config("../etc/missing.hocon")


def test_warnings_for_what_is_valid_but_not_meant() -> None:
    def warnings(text: str) -> list[str]:
        return list(config_warnings(load_config_string(text)))

    quiet = 'sqlite { enable = true, topics = ["t/#"] }\nexhook.emqx { api_key = k, api_secret = s3cret-value }'
    assert warnings(quiet) == []
    assert warnings('sqlite { enable = true, topics = [] }\nexhook.emqx { api_key = k }') == [
        "sqlite.topics is empty: the backend is inactive, no hook is registered and nothing is stored"]
    assert warnings('redis { enable = true, topics = ["$SYS/#"] }\nexhook.emqx { api_key = k }') == [
        "redis.topics: '$SYS/#' never matches: EMQX does not pass $SYS messages to exhooks",
        "redis.topics: no filter can match a message: nothing will be stored"]
    [deadline] = warnings(quiet + "\nexhook.publish_deadline = 5s")
    assert deadline.startswith("exhook.publish_deadline 5s is not below exhook.emqx.hook_timeout (5s, EMQX's "
                               "request_timeout for this service)")
    assert warnings(quiet + "\nexhook.publish_deadline = 4999ms") == []
    # the broker's timeout as the operator set it, not EMQX's default
    [short_hook] = warnings(quiet.replace("api_key = k", "api_key = k, hook_timeout = 2s")
                            + "\nexhook.publish_deadline = 2s")
    assert short_hook.startswith("exhook.publish_deadline 2s is not below exhook.emqx.hook_timeout (2s")
    assert warnings(quiet.replace("api_key = k", "api_key = k, hook_timeout = 10s")
                    + "\nexhook.publish_deadline = 6s") == []
    [long_hook] = warnings(quiet.replace("api_key = k", "api_key = k, hook_timeout = 26s"))
    assert long_hook.startswith("exhook.emqx.hook_timeout 26s is above 25s: the restore of clients whose connect "
                                "calls EMQX gave up on looks back 30s")
    assert warnings(quiet.replace("api_key = k", "api_key = k, hook_timeout = 25s")) == []
    [key] = warnings('sqlite { enable = true, topics = ["t/#"] }')
    assert key.startswith("exhook.emqx.api_key is empty: EMQX refuses replays and restores (401)")
    [linger] = warnings(quiet.replace('"t/#"]', '"t/#"], batch_size = 100, batch_time = 500'))
    assert linger.startswith("sqlite.batch_time 500ms is not below exhook.publish_deadline (500ms)")
    assert warnings(quiet.replace('"t/#"]', '"t/#"], batch_size = 1, batch_time = 500')) == []
    short = 'mysql { enable = true, topics = ["t/#"], password = "pw" }\nexhook.emqx { api_key = k, api_secret = s }'
    assert [w.split(" is shorter")[0] for w in warnings(short)] == ["exhook.emqx.api_secret", "mysql.password"]


@pytest.mark.parametrize(("text", "field", "value"), [
    # HOCON reads these as numbers or booleans; back as text they could differ
    ("mysql { enable = true, password = 00123456 }", "mysql.password", "123456"),
    ("redis { enable = true, password = 1e5 }", "redis.password", "100000"),
    ("sqlite { enable = true }\nexhook { emqx { api_secret = 987654321 } }", "exhook.emqx.api_secret", "987654321"),
    ("sqlite { enable = true }\nexhook { emqx { api_secret = true } }", "exhook.emqx.api_secret", "True"),
    ("sqlite { enable = true }\nexhook { emqx { api_key = 4711 } }", "exhook.emqx.api_key", "4711"),
])
def test_an_unquoted_secret_is_refused_without_showing_it(text: str, field: str, value: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config_string(text)
    message = str(err.value)
    assert message.startswith(f"{field}: unquoted ") and "write it in double quotes" in message
    assert value not in message and "\n" not in message


def test_an_unquoted_value_that_is_no_secret_is_shown() -> None:
    with pytest.raises(ConfigError, match=r"^mysql\.database: unquoted 42 is read as a number"):
        load_config_string("mysql { enable = true, database = 42 }")


API_PASSWORD = "url-pass-Qz8"


@pytest.mark.parametrize(("url", "reason"), [
    ("http://emqx:99999", "the port must be 1-65535"),
    ("http://emqx:0", "the port must be 1-65535"),
    ("http://emqx:18083/api", "must have no path"),
    ("http://emqx:18083/api/v5/", "must have no path"),
    ("http://[::1", "not a valid URL"),
    (f"http://ops:{API_PASSWORD}@emqx:18083", "must not carry credentials"),
    ("http://ops@emqx:18083", "must not carry credentials"),
    (f"http://ops:{API_PASSWORD}@[::1", "not a valid URL"),
    ("http://emqx:18083?x=1", "must have no query or fragment"),
    ("http://emqx:18083/?", "must have no query or fragment"),
    ("http://emqx:18083#top", "must have no query or fragment"),
    ("ftp://emqx:18083", "the scheme must be http or https"),
    ("localhost", "the scheme must be http or https"),
    ("emqx:18083", "the scheme must be http or https"),
    ("http://", "no valid host"),
    ("http:///api", "no valid host"),
    ("http://:18083", "not a valid URL"),
    ("http://emqx :18083", "contains whitespace"),
])
def test_a_malformed_api_url_is_one_line_naming_the_field(url: str, reason: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config_string(f'sqlite {{ enable = true }}\nexhook {{ emqx {{ api_url = "{url}" }} }}')
    message = str(err.value)
    assert message.startswith(f"exhook.emqx.api_url: {reason}"), message
    assert "\n" not in message and API_PASSWORD not in message


@pytest.mark.parametrize(("url", "kept"), [
    ("http://127.0.0.1:18083", "http://127.0.0.1:18083"),
    ("http://emqx:18083/", "http://emqx:18083"),
    ("https://[::1]:18083", "https://[::1]:18083"),
    ("https://emqx.example.com", "https://emqx.example.com"),
])
def test_a_well_formed_api_url_is_taken(url: str, kept: str) -> None:
    cfg = load_config_string(f'sqlite {{ enable = true }}\nexhook {{ emqx {{ api_url = "{url}" }} }}')
    assert cfg.service.emqx.url == kept


def test_check_config_does_not_print_credentials_of_the_api_url(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.cli_run import run_cli

    path = tmp_path / "c.hocon"
    path.write_text(f'sqlite {{ enable = true, path = "{tmp_path}/db.sqlite3" }}\n'
                    f'exhook {{ emqx {{ api_url = "http://ops:{API_PASSWORD}@127.0.0.1:18083" }} }}\n')
    assert run_cli(["check-config", "--config", str(path)]) != 0
    out, err = capsys.readouterr()
    assert "exhook.emqx.api_url: must not carry credentials" in err
    assert API_PASSWORD not in out + err


def spool_and_store(tmp_path: Path, store: str, spool: str) -> str:
    return f'sqlite {{ enable = true, path = "{store}" }}\nexhook {{ spool.path = "{spool}" }}'


@pytest.mark.parametrize(("store", "spool", "reason"), [
    ("db.sqlite3", "db.sqlite3", "is the SQLite store (sqlite.path)"),
    ("data/db.sqlite3", "data/../data/./db.sqlite3", "is the SQLite store (sqlite.path)"),
    ("link.sqlite3", "db.sqlite3", "is the SQLite store (sqlite.path)"),  # the store is a symlink to it
    ("hard.sqlite3", "db.sqlite3", "is the SQLite store (sqlite.path)"),  # ... or a hard link
    ("db.sqlite3.1", "db.sqlite3", "worker 1 would spool to"),
])
def test_a_spool_on_the_sqlite_store_is_refused(tmp_path: Path, store: str, spool: str, reason: str) -> None:
    # worker 0 of several took the store over as an earlier run's spool, and deleted it
    (tmp_path / "db.sqlite3").write_bytes(b"")
    (tmp_path / "link.sqlite3").symlink_to(tmp_path / "db.sqlite3")
    os.link(tmp_path / "db.sqlite3", tmp_path / "hard.sqlite3")
    with pytest.raises(ConfigError) as err:
        load_config_string(spool_and_store(tmp_path, store, spool), tmp_path)
    message = str(err.value)
    assert message.startswith("exhook.spool.path: ") and reason in message, message
    assert "\n" not in message


def test_a_spool_beside_the_sqlite_store_is_taken(tmp_path: Path) -> None:
    for store, spool in (("db.sqlite3", "db.sqlite3.spool"), ("db.sqlite3", "spool.sqlite3"),
                         ("a/db.sqlite3.1", "b/db.sqlite3")):
        cfg = load_config_string(spool_and_store(tmp_path, store, spool), tmp_path)
        assert cfg.service.spool.path == str(tmp_path / spool)
    # only the SQLite store has a file to clash with
    assert load_config_string(f'redis {{ enable = true }}\nexhook {{ spool.path = "{tmp_path}/x" }}')


@pytest.mark.parametrize(("prefix", "refused"), [("{}m", True), ("a{}:msg", True), ("{mqtt}:msg", False),
                                                 ("mq{tt", False), ("m}{", False)])
def test_an_empty_hash_tag_in_the_message_prefix_is_refused_in_cluster_mode(prefix: str, refused: bool) -> None:
    text = (f'redis {{ enable = true, redis_type = cluster, servers = "127.0.0.1:7000", '
            f'message_key_prefix = "{prefix}" }}')
    if refused:
        with pytest.raises(ConfigError, match=r"^redis\.message_key_prefix: an empty hash tag"):
            load_config_string(text)
    else:
        assert load_config_string(text).backend.message_key_prefix == prefix  # type: ignore[union-attr]
