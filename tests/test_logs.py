"""Structured log lines: key=value or JSON, one line per event, secrets masked."""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from exhook.logs import MASK, JsonFormatter, KeyValueFormatter, LogWriter, redactor, setup_logging, stop_logging
from tests.cli_run import ROOT

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


QUOTED_SECRET = 'pa"ss\\w0rd'  # a quote and a backslash: escaped, it no longer matches itself


@pytest.mark.parametrize("formatter", [KeyValueFormatter, JsonFormatter])
def test_a_secret_that_escaping_changes_is_masked_all_the_same(formatter: type) -> None:
    line = formatter([QUOTED_SECRET], worker=None).format(
        record("login with %s", QUOTED_SECRET, error=f"auth {QUOTED_SECRET} refused",
               detail={"dsn": f"redis://u:{QUOTED_SECRET}@h", "tries": [QUOTED_SECRET, 2]},
               cause=RuntimeError(f"bad password {QUOTED_SECRET}")))
    for form in (QUOTED_SECRET, json.dumps(QUOTED_SECRET)[1:-1], "w0rd"):
        assert form not in line, line
    assert line.count(MASK) == 5  # message, error, both in detail, cause
    assert "\n" not in line


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
    stop_logging()  # writes what the writer thread has queued
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


class StuckStream:
    """A stderr whose reader stalls: ``write`` blocks until released."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.writing = threading.Event()
        self.release = threading.Event()

    def write(self, text: str) -> None:
        self.writing.set()
        assert self.release.wait(30), "the test never released the stream"
        self.lines.append(text)

    def flush(self) -> None:
        pass


def stuck_writer(max_lines: int = 100) -> tuple[LogWriter, StuckStream, logging.Logger]:
    stream = StuckStream()
    writer = LogWriter(KeyValueFormatter([SECRET], worker=None), stream.write, max_lines)
    logger = logging.getLogger(f"exhook.test.stuck{id(writer)}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(writer.hand_over)
    return writer, stream, logger


def test_a_log_call_returns_while_stderr_is_stuck_and_the_line_follows() -> None:
    writer, stream, logger = stuck_writer()
    logger.info("first with %s", SECRET)
    assert stream.writing.wait(10)  # the writer thread is inside write(), blocked
    logger.info("second", extra={"event": "second"})  # returns although stderr takes nothing
    assert stream.lines == []
    stream.release.set()
    writer.close()
    assert len(stream.lines) == 2
    assert f"first with {MASK}" in stream.lines[0] and SECRET not in stream.lines[0]
    assert "event=second" in stream.lines[1]


def test_closing_gives_up_on_a_stderr_that_stays_stuck() -> None:
    writer, stream, logger = stuck_writer()
    logger.info("never written while stuck")
    assert stream.writing.wait(10)
    writer.close(timeout=0.05)  # returns: an exiting process is not held by its log
    assert stream.lines == []
    stream.release.set()  # let the thread end


def test_lines_beyond_the_queue_are_dropped_counted_and_reported() -> None:
    writer, stream, logger = stuck_writer(max_lines=2)
    counted: list[int] = []
    writer.on_dropped = counted.append
    logger.info("line 0")
    assert stream.writing.wait(10)  # line 0 left the queue and blocks in write()
    for i in range(1, 6):
        logger.info("line %d", i)  # 1 and 2 fill the queue, 3 to 5 are dropped
    assert sum(counted) == 3  # counted as they are dropped, while stderr is still stuck
    stream.release.set()
    writer.close()
    assert [n for n in range(6) if any(f"line {n}" in line for line in stream.lines)] == [0, 1, 2]
    # one line for the drops, once the writer has caught up (after what was queued before them)
    assert "3 log lines dropped" in stream.lines[-1] and "event=log_lines_dropped" in stream.lines[-1]
    assert sum("log lines dropped" in line for line in stream.lines) == 1


def test_the_arguments_of_a_line_are_rendered_when_it_is_logged() -> None:
    writer, stream, logger = stuck_writer()
    logger.info("first")
    assert stream.writing.wait(10)
    items = ["before"]
    logger.info("items %s", items)
    items.append("after")  # changed while the line waits for the writer
    stream.release.set()
    writer.close()
    assert "items ['before']" in stream.lines[1]


async def test_a_running_service_counts_dropped_lines_while_stderr_is_stuck(restore_root_logger: None,
                                                                           tmp_path: Path) -> None:
    from exhook.config import load_config_string
    from exhook.server import Service
    from tests.ports import free_port

    stream = StuckStream()
    setup_logging("critical", write=stream.write, max_lines=1)
    cfg = load_config_string(f'exhook {{ listen = "127.0.0.1:{free_port()}", http.enable = false }}\n'
                             f'sqlite {{ enable = true, path = "{tmp_path}/db.sqlite3", topics = ["t/#"] }}\n')
    service = Service(cfg)
    await service.start()
    try:
        log = logging.getLogger("exhook.test.metric")
        log.critical("taken by the writer, which blocks in write()")
        assert await asyncio.to_thread(stream.writing.wait, 10)
        for i in range(3):
            log.critical("line %d", i)  # the first waits in the queue (1 line), two are dropped
        assert service.metrics.sample("log_lines_dropped_total") == 2
    finally:
        stream.release.set()
        await service.stop()
        stop_logging()
    assert "2 log lines dropped" in "".join(stream.lines)


def test_a_process_exits_at_once_with_lines_queued_for_a_stderr_nobody_reads(tmp_path: Path) -> None:
    # the writer thread is blocked in a write when the process stops its log: the stop
    # gives up after its timeout, later lines are dropped, and the process exits
    script = tmp_path / "exits.py"
    script.write_text(
        "import logging, sys\n"
        "from exhook.logs import setup_logging, stop_logging\n"
        "setup_logging('info')\n"
        "for i in range(5000):\n"
        "    logging.getLogger('exhook.test').info('line %d %s', i, 'x' * 200)\n"
        "stop_logging(timeout=0.2)\n"
        "logging.getLogger('exhook.test').info('after the writer stopped')\n"
        "sys.exit(3)\n")
    proc = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, stderr=subprocess.PIPE)
    try:
        assert proc.stderr is not None
        fcntl.fcntl(proc.stderr.fileno(), fcntl.F_SETPIPE_SZ, 4096)
        assert proc.wait(timeout=60) == 3  # without reading stderr
    finally:
        proc.kill()
        proc.wait()
