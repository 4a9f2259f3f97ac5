"""A store written by the Erlang plugin (plain Redis commands in its layout) is
replayed by the service, and acknowledged messages leave no keys behind."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest

from storage.base62 import msgid_to_b62
from tests.e2e.backends import RedisBackend
from tests.e2e.harness import Harness

ROOT = Path(__file__).resolve().parents[2]


async def write_like_the_plugin(backend: RedisBackend, topic: str, msgids: list[str]) -> None:
    now_ms = time.time() * 1000
    for i, msgid in enumerate(msgids):
        b62 = msgid_to_b62(msgid)
        key = f"{backend.msg_prefix}:{b62}"
        await backend.client.hset(key, mapping={
            "id": b62, "from": "plugin-publisher", "qos": "1", "topic": topic,
            "payload": f"from-plugin-{i}".encode() + b"\x00\xff", "ts": str(int(now_ms)), "retain": "false",
        })
        await backend.client.zadd(f"{backend.msg_prefix}:{topic}", {b62: now_ms + i})
        await backend.client.expire(key, 7200)


@pytest.mark.parametrize("version", ["v3", "v2"])
async def test_plugin_written_messages_are_replayed_and_deleted(version: str) -> None:
    backend = RedisBackend()
    h = Harness(backend, version)
    await h.start()
    try:
        ids = ["0005F1B4C2D1E2F30A0B0C0D0E0F1011", "000614A2B7C8D9E0F440000012340001"]
        assert msgid_to_b62(ids[0]) == "MzA4NjM4NjYzNzAyMzU4OTgwNDM2MTUzMDM4MTA2MTczNjB"
        await write_like_the_plugin(backend, "t/legacy", ids)
        sub = h.client("migrated")
        await sub.connect()
        await sub.subscribe("t/legacy", qos=1)
        await sub.wait_for_deliveries(2, timeout=10)
        await h.settle()
        assert [d.payload for d in sub.deliveries] == [b"from-plugin-0\x00\xff", b"from-plugin-1\x00\xff"]
        await sub.unsubscribe("t/legacy")
        await h.settle()
        assert await backend.layout_keys() == []
    finally:
        await h.stop()


async def test_wildcard_replay_of_a_plugin_store_after_rebuilding_the_topic_index(tmp_path: Path) -> None:
    backend = RedisBackend()
    h = Harness(backend, "v3")
    await h.start()
    try:
        await write_like_the_plugin(backend, "t/legacy/a", ["000614A2B7C8D9E0F440000012340001"])
        config = tmp_path / "migrate.hocon"
        config.write_text(backend.hocon(["t/#"], 7200, 1) + "\n")
        command = [sys.executable, "-m", "exhook", "--config", str(config), "--rebuild-topic-index"]
        proc = await asyncio.to_thread(subprocess.run, command, cwd=ROOT, capture_output=True, text=True,
                                       timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert "1 topic" in proc.stdout
        sub = h.client("wild")
        await sub.connect()
        await sub.subscribe("t/legacy/+", qos=1)
        await sub.wait_for_deliveries(1, timeout=10)
        assert sub.deliveries[0].topic == "t/legacy/a"
    finally:
        await h.stop()
