"""Spool files an earlier run with another number of workers left (exhook/spool.py
orphan_paths / adopt_orphans, run by exhook/server.py at start-up): a changed
``exhook.workers`` loses no spooled op."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import sqlite3
from pathlib import Path

import pytest

from exhook.config import HostPort, load_config_string
from exhook.server import Service
from exhook.spool import Spool, adopt_orphans, orphan_paths
from storage.model import DeleteMessage, SaveMessage, StoredMessage
from tests.service_proc import eventually


def save(i: int, topic: str = "t/a") -> SaveMessage:
    return SaveMessage(StoredMessage(f"{i:032X}", "c", topic, 1, False, b"p%d" % i, 1000 + i))


async def spool_with(path: Path, ops: list[SaveMessage | DeleteMessage]) -> None:
    spool = Spool(path)
    await spool.open()
    try:
        if ops:
            await spool.append(ops)
    finally:
        await spool.close()


async def test_which_files_a_process_takes_over(tmp_path: Path) -> None:
    base = tmp_path / "spool"
    for path in (base, tmp_path / "spool.0", tmp_path / "spool.1", tmp_path / "spool.2"):
        await spool_with(path, [])
    assert orphan_paths(base, None, 1) == [tmp_path / "spool.0", tmp_path / "spool.1", tmp_path / "spool.2"]
    # worker 0 of two takes the single process's file and those of workers that no longer exist
    assert orphan_paths(base, 0, 2) == [base, tmp_path / "spool.2"]  # (only worker 0 takes any over)


async def test_orphaned_ops_move_behind_the_own_ones_in_order_and_the_files_go(tmp_path: Path) -> None:
    own_path, first, second = tmp_path / "spool", tmp_path / "spool.0", tmp_path / "spool.1"
    await spool_with(first, [save(1), save(2), DeleteMessage(f"{1:032X}", "t/a")])
    await spool_with(second, [])  # left empty
    target = Spool(own_path)
    await target.open()
    try:
        await target.append([save(0)])
        assert await adopt_orphans(target, [first, second]) == 3
        assert [item.op for item in await target.head(10)] == [
            save(0), save(1), save(2), DeleteMessage(f"{1:032X}", "t/a")]
    finally:
        await target.close()
    assert not first.exists() and not second.exists()


@pytest.mark.parametrize("left", [0, 2])
async def test_the_service_takes_over_at_start_and_says_so_only_when_there_was_something(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, left: int) -> None:
    await spool_with(tmp_path / "spool.3", [save(i) for i in range(left)])  # a run with 4 workers
    cfg = load_config_string(f'sqlite {{ enable = true, path = "{tmp_path}/db.sqlite3", topics = ["t/#"] }}\n'
                             f'exhook {{ spool.path = "{tmp_path}/spool" }}')
    svc = dataclasses.replace(cfg.service, listen=HostPort("127.0.0.1", 0),
                              http=dataclasses.replace(cfg.service.http, enable=False))
    service = Service(dataclasses.replace(cfg, service=svc))
    with caplog.at_level(logging.INFO):
        await service.start()
        try:
            # the taken-over ops drain into the store like any spooled op
            await eventually(lambda: stored(tmp_path / "db.sqlite3") == left, 10, "the ops in the store")
        finally:
            await service.stop()
    assert not (tmp_path / "spool.3").exists()
    took_over = [r.getMessage() for r in caplog.records if "took over" in r.getMessage()]
    assert took_over == ([f"took over {left} spooled write ops of an earlier run"] if left else [])


def stored(db: Path) -> int:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return int(conn.execute("select count(*) from mqtt_msg").fetchone()[0])


def foreign_database(path: Path, *tables: str) -> bytes:
    """An SQLite file of another program under a spool's name; its bytes."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        for table in tables:
            conn.execute(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY AUTOINCREMENT, v TEXT)")
            conn.execute(f"INSERT INTO {table} (v) VALUES ('keep me')")
        conn.commit()
    return path.read_bytes()


async def test_a_file_that_is_no_spool_is_left_alone_in_one_line(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # a store's database, a spool's tables plus one of another program's, none at all, no SQLite
    store = tmp_path / "spool.1"
    kept = {store: foreign_database(store, "mqtt_msg", "mqtt_sub"),
            tmp_path / "spool.2": foreign_database(tmp_path / "spool.2", "ops", "set_aside", "notes"),
            tmp_path / "spool.3": foreign_database(tmp_path / "spool.3")}
    (tmp_path / "spool.4").write_bytes(b"not a database at all\n" * 200)
    kept[tmp_path / "spool.4"] = (tmp_path / "spool.4").read_bytes()
    await spool_with(tmp_path / "spool.5", [save(1)])  # the one real spool among them
    target = Spool(tmp_path / "spool")
    await target.open()
    try:
        with caplog.at_level(logging.WARNING):
            assert await adopt_orphans(target, orphan_paths(tmp_path / "spool", None, 1)) == 1
    finally:
        await target.close()
    assert {path: path.read_bytes() for path in kept} == kept
    assert not (tmp_path / "spool.5").exists()
    lines = [r.getMessage() for r in caplog.records if "not a spool file" in r.getMessage()]
    assert lines == [
        f"spool {store}: not a spool file (tables: mqtt_msg, mqtt_sub): left alone, not taken over",
        f"spool {tmp_path / 'spool.2'}: not a spool file (tables: notes, ops, set_aside): left alone, "
        "not taken over",
        f"spool {tmp_path / 'spool.3'}: not a spool file (tables: none): left alone, not taken over",
        f"spool {tmp_path / 'spool.4'}: not a spool file (not an SQLite file): left alone, not taken over"]


async def test_worker_0_leaves_another_programs_database_at_the_spool_path(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # worker 0 of two takes the file at exhook.spool.path over as a single process's spool
    foreign = tmp_path / "spool"
    before = foreign_database(foreign, "mqtt_msg")
    cfg = load_config_string(f'sqlite {{ enable = true, path = "{tmp_path}/db.sqlite3", topics = ["t/#"] }}\n'
                             f'exhook {{ workers = 2, spool.path = "{foreign}" }}')
    svc = dataclasses.replace(cfg.service, listen=HostPort("127.0.0.1", 0),
                              http=dataclasses.replace(cfg.service.http, enable=False))
    service = Service(dataclasses.replace(cfg, service=svc), worker=0)
    with caplog.at_level(logging.INFO):
        await service.start()
        await service.stop()
    assert foreign.read_bytes() == before
    assert sum("not a spool file" in r.getMessage() for r in caplog.records) == 1


async def test_an_orphan_whose_rows_were_removed_by_hand_is_adopted_without_looping(tmp_path: Path) -> None:
    orphan_path = tmp_path / "spool.0"
    await spool_with(orphan_path, [save(1), save(2)])
    orphan = Spool(orphan_path)
    await orphan.open()
    with sqlite3.connect(orphan_path) as shell:  # behind the open spool's back
        shell.execute("DELETE FROM ops WHERE seq = (SELECT max(seq) FROM ops)")
    target = Spool(tmp_path / "spool")
    await target.open()
    try:
        assert await asyncio.wait_for(target.adopt(orphan), 10) == 1
        assert [item.op for item in await target.head(10)] == [save(1)]
    finally:
        await orphan.close()
        await target.close()


async def test_valid_ops_behind_a_thousand_damaged_rows_are_adopted(tmp_path: Path) -> None:
    # a read of the orphan's head that found only damaged rows (moved aside) is empty:
    # the ops behind them must still be moved before the file goes
    orphan_path = tmp_path / "spool.1"
    await spool_with(orphan_path, [save(i) for i in range(1005)])
    with sqlite3.connect(orphan_path) as shell:
        shell.execute("UPDATE ops SET payload = 'text' WHERE seq <= 1000")  # not a payload any more
    target = Spool(tmp_path / "spool")
    await target.open()
    try:
        assert await adopt_orphans(target, [orphan_path]) == 5
        assert [item.op for item in await target.head(10)] == [save(i) for i in range(1000, 1005)]
    finally:
        await target.close()
