"""set-aside and spool: an operator looks into the local spool without running the
service (the spool file is real; the ops in it are what the writer puts there)."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import pytest

from exhook.spool import Spool
from storage.model import DeleteMessage, SaveMessage, StoredMessage
from tests.cli_run import run_cli

MSG = StoredMessage("0005F1B4C2D1E2F30A0B0C0D0E0F1011", "dev1", "t/" + "x" * 200, 1, False, b"\x00hello", 17)


def config(tmp_path: Path) -> Path:
    cfg = tmp_path / "c.hocon"
    cfg.write_text('sqlite { enable = true, path = "db.sqlite3", topics = ["t/#"] }\n'
                   'exhook.spool.path = "spool.sqlite3"\n')  # relative: next to the config file
    return cfg


async def fill(path: Path) -> None:
    spool = Spool(path)
    await spool.open()
    await spool.append([SaveMessage(MSG), DeleteMessage(MSG.msgid, MSG.topic)])
    await spool.set_aside("mysql", "too_long", "[1406] Data too long for column 'topic' at row 1", SaveMessage(MSG))
    await spool.close()


def test_set_aside_shows_what_the_store_refused_with_its_reason(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    asyncio.run(fill(tmp_path / "spool.sqlite3"))
    assert run_cli(["set-aside", "--config", str(config(tmp_path)), "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert (row["backend"], row["reason"], row["op"], row["msgid"], row["topic"]) == (
        "mysql", "too_long", "save", MSG.msgid, MSG.topic)
    assert "Data too long" in row["detail"] and base64.b64decode(row["payload_base64"]) == MSG.payload
    assert run_cli(["set-aside", "--config", str(config(tmp_path))]) == 0
    fields = capsys.readouterr().out.strip().split("\t")
    assert fields[0] == "set_aside" and fields[2:4] == ["mysql", "too_long"] and MSG.msgid in fields


def test_spool_counts_and_lists_waiting_ops_of_every_worker(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    asyncio.run(fill(tmp_path / "spool.sqlite3"))
    asyncio.run(fill(tmp_path / "spool.sqlite3.1"))  # a worker's spool
    assert run_cli(["spool", "--config", str(config(tmp_path)), "--list", "--json"]) == 0
    files = json.loads(capsys.readouterr().out)
    assert [Path(f["path"]).name for f in files] == ["spool.sqlite3", "spool.sqlite3.1"]
    assert all(f["ops"] == 2 and f["bytes"] > len(MSG.topic) for f in files)
    assert [op["op"] for op in files[0]["waiting"]] == ["save", "DeleteMessage"]


def test_no_spool_is_one_line_naming_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["spool", "--config", str(config(tmp_path))]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "exhook.spool.path" in err and str(tmp_path) in err
