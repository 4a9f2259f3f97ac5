"""messages, subscriptions, purge, rebuild-topic-index: look into and clean the store.

Everything goes through the ``Store`` interface (storage/base.py), so the commands work the
same on Redis (single, sentinel, cluster), MySQL and SQLite, and read a store exactly as a
replay does:

* the topics of a filter: an exact filter is its own topic; a wildcard filter is matched
  against ``stored_topics(<literal prefix>)`` (on Redis that is the topic index this service
  keeps: a store written by the Erlang plugin needs ``rebuild-topic-index`` once);
* counts: ``count_messages`` (no payload is read); listing: ``read_messages`` up to each
  topic's newest position, merged in stored (arrival) order;
* purge: topic by topic, pages of ``read_messages`` deleted with ``DeleteMessage`` ops on the
  ordinary write path (on MySQL that is the configured ``delete_message_sql``). It stops at
  the newest position each topic had when the purge started: messages published meanwhile
  are kept. Expired messages are neither counted nor purged (they expire by themselves).
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from exhook.cli.output import CliError, Progress, escape, iso_ms, preview, record
from exhook.config import Config, RedisConfig, SqliteConfig
from exhook.topics import TopicError, is_wildcard, literal_prefix, matches, real_filter, validate_filter
from storage.base import Store
from storage.model import DeleteMessage, StoredMessage

READ_PAGE = 200  # messages per read round trip (payloads are held one page at a time)
COUNT_CHUNK = 500  # topics per count_messages call (a progress line after each)


@asynccontextmanager
async def opened_store(cfg: Config) -> AsyncIterator[Store]:
    from storage.factory import create_store

    backend = cfg.backend
    if isinstance(backend, SqliteConfig) and not _exists(backend.path):
        # opening would create an empty database: say that there is none instead
        raise CliError(f"sqlite.path: no database at {backend.path}", 2)
    store = create_store(backend)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def _exists(path: str) -> bool:
    return Path(path).exists()  # one stat before the store opens; not worth a thread


def parse_filter(text: str) -> str:
    try:
        return validate_filter(real_filter(text))
    except TopicError as exc:
        raise CliError(f"--topic: {exc}", 2) from None


async def matching_topics(store: Store, flt: str) -> list[str]:
    if not is_wildcard(flt):
        return [flt]
    return sorted(t for t in await store.stored_topics(literal_prefix(flt)) if matches(flt, t))


async def count_topics(store: Store, topics: list[str], progress: Progress) -> dict[str, int]:
    """Messages per topic (topics without any left out), sorted by topic."""
    counts: dict[str, int] = {}
    for start in range(0, len(topics), COUNT_CHUNK):
        counts.update(await store.count_messages(topics[start : start + COUNT_CHUNK]))
        if len(topics) > COUNT_CHUNK:
            progress.note(f"counted {min(start + COUNT_CHUNK, len(topics))} of {len(topics)} topics")
    return dict(sorted(counts.items()))


def _hint_empty(cfg: Config, flt: str, progress: Progress) -> None:
    if isinstance(cfg.backend, RedisConfig) and is_wildcard(flt):
        progress.note("no topic matches; if the Erlang plugin wrote this store, run rebuild-topic-index once")


async def _close(iterator: AsyncIterator[Any]) -> None:
    """Finish a read we stopped early (its connection goes back to the pool now, not at GC)."""
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()


def _message_json(msg: StoredMessage) -> dict[str, Any]:
    return {
        "msgid": msg.msgid,
        "topic": msg.topic,
        "qos": msg.qos,
        "timestamp": msg.timestamp,
        "time": iso_ms(msg.timestamp),
        "from": msg.sender,
        "retain": msg.retain,
        "size": len(msg.payload),
        "payload_base64": base64.b64encode(msg.payload).decode("ascii"),
    }


def _message_record(msg: StoredMessage) -> None:
    record("message", msg.msgid, escape(msg.topic), msg.qos, iso_ms(msg.timestamp), len(msg.payload),
           escape(msg.sender), preview(msg.payload))


def _totals(counts: dict[str, int], label: str = "count") -> None:
    for topic, n in counts.items():
        record(label, n, escape(topic))
    record("total", sum(counts.values()), f"topics={len(counts)}")


async def messages(cfg: Config, args: argparse.Namespace) -> int:
    flt = parse_filter(args.topic)
    async with opened_store(cfg) as store:
        return await _messages(cfg, store, args, flt)


async def _messages(cfg: Config, store: Store, args: argparse.Namespace, flt: str) -> int:
    progress = Progress(args.quiet)
    limit = max(0, args.limit)
    counts = await count_topics(store, await matching_topics(store, flt), progress)
    total = sum(counts.values())
    listed: list[dict[str, Any]] = []
    shown = 0
    if not args.count and counts:
        highs = await store.latest_positions(list(counts))
        pages = store.read_messages({t: (None, h) for t, h in highs.items()}, min(READ_PAGE, limit or READ_PAGE))
        try:
            async for page in pages:
                for msg in page[: limit - shown] if limit else page:
                    if args.json:
                        listed.append(_message_json(msg))
                    else:
                        _message_record(msg)
                    shown += 1
                    if shown % progress.every == 0:
                        progress.note(f"listed {shown} messages")
                if limit and shown >= limit:
                    break
        finally:
            await _close(pages)
    if args.json:
        doc: dict[str, Any] = {"filter": flt, "total": total, "topics": counts}
        if not args.count:
            doc["messages"] = listed
        print(json.dumps(doc, ensure_ascii=False))
    else:
        _totals(counts)
    if not counts:
        _hint_empty(cfg, flt, progress)
    elif not args.count and limit and total > shown:
        progress.note(f"listed {shown} of {total} messages (--limit 0 lists all)")
    return 0


async def subscriptions(cfg: Config, args: argparse.Namespace) -> int:
    async with opened_store(cfg) as store:
        subs = sorted(await store.subscriptions(args.clientid), key=lambda s: s.topic)
    if args.json:
        print(json.dumps({"clientid": args.clientid,
                          "subscriptions": [{"topic": s.topic, "qos": s.qos} for s in subs]}, ensure_ascii=False))
    else:
        for sub in subs:
            record("subscription", escape(args.clientid), escape(sub.topic), sub.qos)
    if not subs:
        print(f"offline-exhook: no stored subscriptions for client {args.clientid!r}", file=sys.stderr)
    return 0


async def purge(cfg: Config, args: argparse.Namespace) -> int:
    flt = parse_filter(args.topic)
    async with opened_store(cfg) as store:
        return await _purge(cfg, store, args, flt)


async def _purge(cfg: Config, store: Store, args: argparse.Namespace, flt: str) -> int:
    progress = Progress(args.quiet)
    counts = await count_topics(store, await matching_topics(store, flt), progress)
    total = sum(counts.values())
    if not counts:
        _report_purge(args, flt, counts, None)
        _hint_empty(cfg, flt, progress)
        return 0
    if not args.yes:
        _report_purge(args, flt, counts, None)
        print(f"offline-exhook: dry run, nothing deleted: run again with --yes to delete these {total} "
              f"message(s) in {len(counts)} topic(s)", file=sys.stderr)
        return 1
    highs = await store.latest_positions(list(counts))
    deleted: dict[str, int] = {}
    done = 0
    for i, (topic, high) in enumerate(sorted(highs.items()), 1):
        n = 0
        async for page in store.read_messages({topic: (None, high)}, READ_PAGE):
            await store.write([DeleteMessage(msg.msgid, msg.topic) for msg in page])
            n += len(page)
            before, done = done, done + len(page)
            progress.advance(before, done, f"purge: {done} of {total} messages deleted")
        if n:
            deleted[topic] = n
        if len(highs) > 1:
            progress.note(f"purge: topic {i} of {len(highs)} done, {n} deleted: {escape(topic)}")
    _report_purge(args, flt, deleted, done)
    return 0


def _report_purge(args: argparse.Namespace, flt: str, counts: dict[str, int], deleted: int | None) -> None:
    if args.json:
        print(json.dumps({"filter": flt, "dry_run": deleted is None and bool(counts),
                          "total": sum(counts.values()), "topics": counts,
                          "deleted": deleted or 0}, ensure_ascii=False))
    else:
        _totals(counts, "count" if deleted is None else "deleted")


async def rebuild_topic_index(cfg: Config) -> int:
    if not isinstance(cfg.backend, RedisConfig):
        raise CliError("rebuild-topic-index applies to the redis backend only", 2)
    from storage.redis import RedisStore

    async with opened_store(cfg) as store:
        assert isinstance(store, RedisStore)
        found = await store.rebuild_topic_index()
    print(f"offline-exhook: indexed {found} topic(s) with stored messages")
    return 0
