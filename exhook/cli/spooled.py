"""set-aside, spool: look into the local spool (exhook/spool.py) without running the service.

``set-aside`` lists the write ops the store refused for good (newest first): when, which
backend, why (the reason label of ``writes_rejected_total`` and the database's own
words), and the op itself (a message with its payload, or an ack or re-key). ``spool``
tells how many write ops wait in each spool file for the store, and lists them with
``--list``. Both read every spool file of the configured path (``path`` and the
workers' ``path.N``).
"""

from __future__ import annotations

import argparse
import base64
import json
from pathlib import Path
from typing import Any

from exhook.cli.output import CliError, escape, iso_ms, preview, record
from exhook.config import Config
from exhook.spool import SetAside, Spool, SpoolError, spool_files
from storage.model import SaveMessage, WriteOp


def _spool_files(cfg: Config) -> list[Path]:
    found = spool_files(cfg.service.spool.path)
    if not found:
        raise CliError(f"exhook.spool.path: no spool at {Path(cfg.service.spool.path).resolve()} "
                       "(nothing was ever spooled)", 1)
    return found


def _op_fields(op: WriteOp) -> dict[str, Any]:
    if isinstance(op, SaveMessage):
        m = op.message
        return {"op": "save", "msgid": m.msgid, "topic": m.topic, "qos": m.qos, "from": m.sender,
                "timestamp": m.timestamp, "size": len(m.payload),
                "payload_base64": base64.b64encode(m.payload).decode("ascii")}
    fields = {name: getattr(op, name) for name in op.__slots__}  # type: ignore[union-attr]
    return {"op": type(op).__name__, **fields}


def _op_columns(op: WriteOp) -> list[object]:
    if isinstance(op, SaveMessage):
        m = op.message
        return ["save", m.msgid, escape(m.topic), m.qos, len(m.payload), preview(m.payload)]
    fields = _op_fields(op)
    return [fields.pop("op"), *(escape(str(v)) for v in fields.values())]


async def set_aside(cfg: Config, args: argparse.Namespace) -> int:
    rows: list[SetAside] = []
    for path in _spool_files(cfg):
        spool = Spool(path)
        try:
            await spool.open()
            rows += await spool.set_aside_rows(args.limit)
        except SpoolError as exc:
            raise CliError(str(exc), 1) from None
        finally:
            await spool.close()
    rows.sort(key=lambda r: r.at_ms, reverse=True)
    rows = rows[: args.limit]
    if args.json:
        print(json.dumps([{"time": iso_ms(r.at_ms), "backend": r.backend, "reason": r.reason,
                           "detail": r.detail, **_op_fields(r.op)} for r in rows], indent=2))
    else:
        for r in rows:
            record("set_aside", iso_ms(r.at_ms), r.backend, r.reason, escape(r.detail), *_op_columns(r.op))
    return 0


async def spooled(cfg: Config, args: argparse.Namespace) -> int:
    report: list[dict[str, Any]] = []
    for path in _spool_files(cfg):
        spool = Spool(path)
        try:
            await spool.open()
            waiting = await spool.head(args.limit, move_damaged=False) if args.list else []
        except SpoolError as exc:
            raise CliError(str(exc), 1) from None
        finally:
            await spool.close()
        report.append({"path": str(path), "ops": spool.count, "bytes": spool.bytes,
                       "waiting": [_op_fields(item.op) for item in waiting]})
        if not args.json:
            record("spool", str(path), spool.count, spool.bytes)
            for item in waiting:
                record("waiting", item.seq, *_op_columns(item.op))
    if args.json:
        print(json.dumps(report, indent=2))
    return 0
