"""Structured log lines: key=value or JSON, one line per event, secrets masked."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from exhook.logs import MASK, JsonFormatter, KeyValueFormatter, redactor, setup_logging

SECRET = "s3cr3t-Pa55"


def record(msg: str, *args: object, exc: bool = False, **extra: object) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise RuntimeError(f"login failed for password {SECRET}")
        except RuntimeError:
            import sys
            exc_info = sys.exc_info()
    rec = logging.LogRecord("exhook.test", logging.WARNING, __file__, 1, msg, args, exc_info)
    for key, value in extra.items():
        setattr(rec, key, value)
    return rec


def test_key_value_line_carries_event_fields() -> None:
    line = KeyValueFormatter([], worker=None).format(
        record("store %s failed", "redis", event="store_write_failed", pending=3, error="boom now"))
    assert line.startswith("ts=")
    fields = line.split(" ", 1)[1]
    assert fields == 'level=warning logger=exhook.test msg="store redis failed" event=store_write_failed ' \
                     'pending=3 error="boom now"'


def test_json_line_parses_with_the_same_fields() -> None:
    line = JsonFormatter([], worker=2).format(record("ready", event="ready", backend="mysql"))
    entry = json.loads(line)
    assert {k: v for k, v in entry.items() if k != "ts"} == {
        "level": "warning", "logger": "exhook.test", "worker": 2, "msg": "ready", "event": "ready",
        "backend": "mysql"}
    assert entry["ts"].endswith("Z")


@pytest.mark.parametrize("formatter", [KeyValueFormatter, JsonFormatter])
def test_secrets_are_masked_everywhere_and_a_traceback_stays_on_one_line(formatter: type) -> None:
    line = formatter([SECRET, ""], worker=None).format(
        record("dsn redis://u:%s@h", SECRET, exc=True, error=f"auth {SECRET} refused"))
    assert SECRET not in line
    assert line.count(MASK) == 3  # message, extra field, exception text
    assert "\n" not in line
    assert "RuntimeError" in line


def test_redactor_masks_the_longer_secret_whole() -> None:
    redact = redactor(["abc", "abcdef"])
    assert redact("x abcdef y abc") == f"x {MASK} y {MASK}"


@pytest.fixture
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_setup_logging_installs_one_masking_handler(restore_root_logger: None,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("info", "json", None, [SECRET])
    assert len(logging.getLogger().handlers) == 1
    logging.getLogger("exhook.x").info("connecting with %s", SECRET, extra={"event": "connect"})
    logging.getLogger("exhook.x").debug("below the level")
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0])["msg"] == f"connecting with {MASK}"


def test_the_api_secret_is_masked_in_every_form_it_travels() -> None:
    import base64

    from exhook.config import load_config_string
    from exhook.config_checks import config_secrets

    cfg = load_config_string('sqlite { enable = true }\nexhook.emqx { api_key = "ops", api_secret = "' + SECRET + '" }')
    token = base64.b64encode(f"ops:{SECRET}".encode()).decode()
    redact = redactor(config_secrets(cfg))
    echoed = (f'400 {{"message": "bad", "headers": {{"Authorization": "Basic {token}"}}}} '
              f"raw={token} url=http://ops:{SECRET}@emqx authorization: bearer abcdefghijklmnop")
    masked = redact(echoed)
    assert SECRET not in masked and token not in masked and "abcdefghijklmnop" not in masked
    assert masked.count(MASK) == 4
    # a word that merely follows "basic" is left alone when it cannot be a credential
    assert redact("basic auth failed") == "basic auth failed"
