"""The tables of one run (markdown), every figure next to the no-op server's of the same
run, the target verdicts of issues 11 and 14 (met / MISSED, computed from the run), and
BENCHMARKS.md: the generated part lives between two markers; everything outside them is
hand-written and kept."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

from bench.loadgen import PhaseResult
from bench.results import NOOP, LoadCell, Results, TargetRun, ratio

BEGIN = "<!-- bench:generated:begin (written by `make bench`; edit outside these markers) -->"
END = "<!-- bench:generated:end -->"

HEADER = """# Benchmarks

Measured with `make bench` (`python -m bench`, see `bench/__init__.py` for what each table
means). The section between the markers below is overwritten by every run that writes
this file; notes outside it are hand-written.

"""

# counters that should stay at zero in a healthy run (shown when they moved)
_TROUBLE_COUNTERS = ("publish_deadline_answers_total", "writes_dropped_total", "store_failures_total",
                     "replay_failures_total", "client_jobs_dropped_total")


def _num(value: float | None, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def _ms(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 100 else f"{value:,.0f}"


def pct(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{100 * value:.0f}%"


def mb(value: int | None) -> str:
    return "-" if value is None else f"{value / 1024 / 1024:.0f}"


def _delta(value: float | None, base: float | None, fmt: Callable[[float | None], str]) -> str:
    """``value (+difference)`` against the no-op's figure."""
    if value is None or math.isnan(value):
        return "-"
    if base is None or math.isnan(base):
        return fmt(value)
    diff = value - base
    return f"{fmt(value)} ({'+' if diff >= 0 else '−'}{fmt(abs(diff))})"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table and the blank line after it."""
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return [*out, ""]


def _bullets(lines: list[str], title: str = "") -> list[str]:
    if not lines:
        return []
    return [*([title, ""] if title else []), *(f"- {line}" for line in lines), ""]


def _ok(flag: bool) -> str:
    return "met" if flag else "MISSED"


# -- publish and mixed ---------------------------------------------------------------------------
def _metric_row(n: int, label: str, cells: dict[str, LoadCell | None],
                get: Callable[[LoadCell], float | None], kind: str) -> list[str]:
    """One figure of every target at one N; the no-op's plain, the others next to it."""
    noop = cells.get(NOOP)
    base = get(noop) if noop is not None else None
    out = [str(n), label]
    for t, cell in cells.items():
        if cell is None:
            out.append("-")
            continue
        value = get(cell)
        if t == NOOP:
            text = _num(value) if kind in ("rate", "cpu") else _ms(value)
        elif kind == "rate":
            text = f"{_num(value)} ({pct(ratio(value, base))})"
        elif kind == "cpu":
            text = _delta(value, base, _num)
        else:
            text = _delta(value, base, _ms)
        if kind == "rate" and cell.phase.errors:
            text += f" ⚠ {cell.phase.errors} errors"
        out.append(text)
    return out


def _load_rows(cells: dict[tuple[str, str, int], LoadCell], res: Results, protocol: str, ns: list[int],
               mixed: bool) -> list[list[str]]:
    rows: list[list[str]] = []
    pub = " publish" if mixed else ""
    for n in ns:
        at = {t: cells.get((protocol, t, n)) for t in res.targets}
        rows.append(_metric_row(n, "msg/s (published and acked)" if mixed else "msg/s", at, lambda c: c.phase.rate,
                                "rate"))
        rows.append(_metric_row(n, f"p50 ms{pub}", at, lambda c: c.phase.latency.p50, "ms"))
        rows.append(_metric_row(n, f"p99 ms{pub}", at, lambda c: c.phase.latency.p99, "ms"))
        rows.append(_metric_row(n, f"p99.9 ms{pub}", at, lambda c: c.phase.latency.p999, "ms"))
        if mixed:
            rows.append(_metric_row(n, "p50 ms ack", at, lambda c: c.phase.ack_latency.p50, "ms"))
            rows.append(_metric_row(n, "p99 ms ack", at, lambda c: c.phase.ack_latency.p99, "ms"))
        rows.append(_metric_row(n, "server CPU µs/" + ("msg (publish + ack)" if mixed else "call"), at,
                                lambda c: c.cpu_us, "cpu"))
        rows.append([str(n), "cores: server / loadgen / other",
                     *("-" if c is None else f"{c.server_cores:.2f} / {c.gen_cores:.2f} / {c.other_cores:.2f}"
                       for c in at.values())])
    return rows


def _load_notes(cells: dict[tuple[str, str, int], LoadCell], protocol: str) -> list[str]:
    notes = []
    for (p, t, n), cell in sorted(cells.items()):
        if p != protocol:
            continue
        ph = cell.phase
        bits = []
        if ph.errors:
            bits.append(f"{ph.errors} failed calls ({ph.error_sample[:100]})")
        if ph.wrong_answers:
            bits.append(f"{ph.wrong_answers} answers other than IGNORE")
        if cell.drained and not cell.drained.startswith("store back"):
            bits.append(cell.drained)
        if ph.backlog:
            bits.append(f"{ph.backlog:,} acks still queued when the window closed")
        if bits:
            notes.append(f"{t} N={n}: " + "; ".join(bits))
    return notes


# -- replay ---------------------------------------------------------------------------------------
def _replay_rows(res: Results) -> list[list[str]]:
    rows = []
    for protocol in res.protocols:
        ceil = res.ceilings.get(protocol)
        if ceil is not None:
            shown = ceil.wire or ceil.answer
            rows.append([protocol, "no-op (ceiling)", _num(ceil.rate), "100%",
                         f"{_ms(shown.p50)} / {_ms(shown.p99)} / {_ms(shown.p999)}", _num(ceil.cpu_us),
                         f"{ceil.n:,} messages posted as sequential publish/bulk batches through the stand-in; "
                         f"stand-in round trip per hook call p50 {_ms(ceil.answer.p50)} ms"
                         + ("" if ceil.wire else "; p columns = round trip (no tcpdump)")])
        for t in res.targets:
            rp = res.replays.get((protocol, t))
            if rp is None:
                continue
            shown = rp.wire or rp.answer
            correct = rp.complete and rp.in_order and not rp.duplicates and rp.empty_after_acks == "yes"
            notes = [f"time to last delivery {rp.last_s:.2f} s (first {1e3 * rp.first_s:.0f} ms)",
                     f"delivered {rp.delivered:,}/{rp.n:,}", f"in order {'yes' if rp.in_order else 'NO'}",
                     f"duplicates {rp.duplicates}", f"store back to its size after the acks: {rp.empty_after_acks}",
                     f"{rp.bulk_calls} publish/bulk calls",
                     "service-bound ceiling " + ("-" if rp.projected is None else f"{rp.projected:,.0f} msg/s"),
                     f"SUBACK-blocking hook {rp.subscribe_ms:.1f} ms", f"preload {rp.preload_rate:,.0f} msg/s"]
            if rp.hook_errors:
                notes.append(f"{rp.hook_errors} replay publishes failed")
            if not rp.wire:
                notes.append(f"p columns = stand-in round trip ({rp.wire_note})")
            rows.append([protocol, t + ("" if correct else " ⚠ NOT correct"), _num(rp.rate),
                         pct(ratio(rp.rate, ceil.rate if ceil else None)),
                         f"{_ms(shown.p50)} / {_ms(shown.p99)} / {_ms(shown.p999)}",
                         _delta(rp.cpu_us, ceil.cpu_us if ceil else None, lambda v: _num(v)), "; ".join(notes)])
    return rows


# -- storm ----------------------------------------------------------------------------------------
def _storm_rows(res: Results) -> list[list[str]]:
    rows = []
    for n in res.storm_sizes:
        for w in res.storm_workers:
            noop = res.storms.get((n, w, NOOP))
            for t in res.targets:
                s = res.storms.get((n, w, t))
                if s is None:
                    continue
                wall = max(s.wall_s, 1e-9)
                base = noop.connack_hold if noop is not None and t != NOOP else None
                hold = (f"{_delta(s.connack_hold.p50, base.p50 if base else None, _ms)} / "
                        f"{_delta(s.connack_hold.p99, base.p99 if base else None, _ms)}")
                notes = [f"hooks holding CONNACK: {', '.join(s.hooks) or 'none'}",
                         f"client.connected p50 / p99 {_ms(s.connected.p50)} / {_ms(s.connected.p99)} ms",
                         f"preparation {s.prepare_s:.1f} s"]
                if s.subscribed.n:
                    notes.insert(2, f"session.subscribed p50 / p99 {_ms(s.subscribed.p50)} / "
                                    f"{_ms(s.subscribed.p99)} ms")
                if s.failed:
                    notes.append("failed: " + ", ".join(f"{k} ×{v}" for k, v in sorted(s.failed.items())))
                if s.stored_before is not None:
                    after = "?" if s.stored_after is None else f"{s.stored_after:,}"
                    notes.append(f"store: {s.stored_before:,} messages before the storm, {after} after")
                if s.rest_calls:
                    notes.append("REST: " + ", ".join(f"{k} {v:,}" for k, v in sorted(s.rest_calls.items())))
                notes.append(f"hook calls in flight at most {s.max_in_flight:,}")
                if s.complete_s is None and t != NOOP:
                    notes.append(f"INCOMPLETE: last replay at {s.last_s:.1f} s, gave up at {s.wall_s:.1f} s")
                if s.error:
                    notes.append(s.error[:300])
                done = "-" if t == NOOP else f"{s.restored:,} / {s.replayed:,} of {n:,}"
                rows.append([f"{n:,}", str(w), t, done, "-" if s.complete_s is None else f"{s.complete_s:.1f}",
                             _num(s.rate), hold,
                             f"{_ms(s.connack_seen.p50)} / {_ms(s.connack_seen.p99)} ({s.connacks:,})",
                             str(s.failed_calls) + (f" (no-op {noop.failed_calls})" if noop and t != NOOP else ""),
                             "-" if t == NOOP else str(s.duplicates),
                             f"{s.server_cpu_s / wall:.2f} / {s.emulator_cpu_s / wall:.2f} / "
                             f"{(s.other_cores or 0):.2f}",
                             "; ".join(notes)])
    return rows


# -- raw ------------------------------------------------------------------------------------------
def _raw_rows(res: Results, args: argparse.Namespace) -> list[list[str]]:
    rows = []
    for name in args.backends:
        raw, commit = res.raw.get(name), res.commits.get(name)
        if raw is None and commit is None:
            continue
        rows.append([name, _num(raw.write_rate) if raw else "-", _num(raw.delete_rate) if raw else "-",
                     f"{_ms(commit.p50_ms)} / {_ms(commit.p99_ms)}" if commit else "-",
                     _ms(commit.baseline_ms) if commit else "-",
                     "; ".join(x for x in ((raw.note if raw else ""), (commit.note if commit else "")) if x)])
    return rows


def _spool_section(res: Results, args: argparse.Namespace) -> list[str]:
    if res.spool is None and not res.recoveries:
        return []
    parts = ["**Spool** (the service's own `exhook/spool.py`: SQLite WAL, synchronous=FULL): what a message costs "
             "when the store cannot take it in time, and how fast an outage's backlog lands once the store is back "
             "(the service's own writer draining a spool of that many messages into the store)", ""]
    rows = []
    if res.spool is not None:
        sp = res.spool
        rows.append(["append", f"one message per append p50 / p99 {_ms(sp.one_p50_ms)} / {_ms(sp.one_p99_ms)} ms "
                     f"({sp.n} appends); batches of 100: {sp.batch_us_per_msg:.0f} µs a message", ""])
    for name in args.backends:
        rec = res.recoveries.get(name)
        if rec is not None:
            rows.append([f"recovery into {name}", f"{rec.messages:,} messages in {rec.seconds:.2f} s",
                         f"{_num(rec.rate)} msg/s"])
    return parts + _table(["what", "measured", "rate"], rows)


def _big_rows(res: Results) -> list[list[str]]:
    rows = []
    for run in res.runs:
        big = run.big
        full: PhaseResult | None = big.get("publish_full")
        if full is None:
            continue
        empty: LoadCell | None = big.get("publish_empty")
        fill: PhaseResult = big["fill"]
        rows.append([f"{run.target}/{run.protocol}", _num(empty.rate) if empty else "-",
                     f"{_num(full.rate)} ({pct(ratio(full.rate, empty.rate if empty else None))} of empty)",
                     _num(fill.rate), _num(big.get("ack_rate")),
                     f"{mb(big.get('rss_10k'))} → {mb(big.get('rss_full'))} → {mb(big.get('rss_acked'))}",
                     f"left in store {big.get('left')}"])
    return rows


def _run_notes(run: TargetRun) -> str:
    bits = [f"RSS {mb(run.rss_idle)} → {mb(run.rss_end)} MB (peak {mb(run.rss_peak)})"]
    c = run.counters
    trips, ops = c.get("store_write_batch_size_count", 0), c.get("store_write_batch_size_sum", 0)
    if trips:
        bits.append(f"writer: {ops:,.0f} ops in {trips:,.0f} store round trips (≈ {ops / trips:.1f} each)")
    bad = {k: v for k, v in c.items() if k.startswith(_TROUBLE_COUNTERS) and v}
    if bad:
        bits.append("counters: " + ", ".join(f"{k} {v:,.0f}" for k, v in bad.items()))
    if run.log_errors:
        bits.append(f"{len(run.log_errors)} error lines logged, first: {run.log_errors[0][:160]}")
    if run.busy_warning:
        bits.append(run.busy_warning)
    if run.error:
        bits.append(f"FAILED: {run.error}")
    return f"{run.target}/{run.protocol}: " + "; ".join(bits)


# -- verdicts ------------------------------------------------------------------------------------
def verdicts(res: Results, args: argparse.Namespace) -> list[str]:
    out: list[str] = []
    backends = [t for t in res.targets if t != NOOP]
    for protocol in res.protocols:
        for n in res.clients:
            noop = res.publish.get((protocol, NOOP, n))
            if noop is None:
                continue
            for t in backends:
                cell = res.publish.get((protocol, t, n))
                if cell is None:
                    continue
                lat, base = cell.phase.latency, noop.phase.latency
                if n == 1:
                    if t == "redis":
                        limit, why = base.p50 + 0.3, f"no-op p50 {_ms(base.p50)} + 0.3"
                    else:
                        commit = res.commits.get(t)
                        extra = commit.p50_ms if commit else float("nan")
                        limit = base.p50 + 1 + extra
                        why = (f"no-op p50 {_ms(base.p50)} + 1 + one commit {_ms(extra)}" if commit
                               else "one commit not measured (phase raw)")
                    out.append(f"[11] {protocol} {t} N=1: p50 {_ms(lat.p50)} ms (target ≤ {why} = {_ms(limit)} ms): "
                               + ("-" if math.isnan(limit) else _ok(lat.p50 <= limit)))
                if n in (32, 256):
                    r = ratio(cell.rate, noop.rate) or 0.0
                    limit = base.p99 + args.batch_time
                    out.append(f"[11] {protocol} {t} N={n}: {100 * r:.0f}% of the no-op's msg/s (target ≥ 90%): "
                               f"{_ok(r >= 0.9)}; p99 {_ms(lat.p99)} ms (target ≤ no-op p99 {_ms(base.p99)} + "
                               f"batch_time {args.batch_time} = {_ms(limit)} ms): {_ok(lat.p99 <= limit)}")
        for n in res.mixed_clients:
            noop = res.mixed.get((protocol, NOOP, n))
            for t in backends:
                cell = res.mixed.get((protocol, t, n))
                if noop is None or cell is None:
                    continue
                r = ratio(cell.rate, noop.rate) or 0.0
                out.append(f"[11] {protocol} {t} mixed N={n}: {100 * r:.0f}% of the no-op's msg/s (target ≥ 90%): "
                           f"{_ok(r >= 0.9)}")
        ceil = res.ceilings.get(protocol)
        for t in backends:
            rp = res.replays.get((protocol, t))
            if rp is None or ceil is None:
                continue
            r = ratio(rp.rate, ceil.rate) or 0.0
            limit = ceil.cpu_us + 25
            correct = rp.complete and rp.in_order and not rp.duplicates and rp.empty_after_acks == "yes"
            out.append(f"[11] {protocol} {t} replay: {_num(rp.rate)} msg/s = {100 * r:.0f}% of the no-op's sequential "
                       f"ceiling {_num(ceil.rate)} (target ≥ 80%): {_ok(r >= 0.8)}; server CPU {_num(rp.cpu_us)} "
                       f"µs/msg (target ≤ no-op {_num(ceil.cpu_us)} + 25): {_ok(rp.cpu_us <= limit)}"
                       + ("" if correct else " — replay NOT correct"))
    for n in res.storm_sizes:
        for w in res.storm_workers:
            snoop = res.storms.get((n, w, NOOP))
            for t in backends:
                s = res.storms.get((n, w, t))
                if s is None:
                    continue
                if n >= 2000:
                    all_ok = s.restored == n and s.replayed == n and s.duplicates == 0
                    line = (f"[14] storm {n:,} clients, {w} worker(s), {t}: {s.failed_calls} failed hook calls "
                            f"(target 0): {_ok(s.failed_calls == 0)}; restored {s.restored:,}, replayed "
                            f"{s.replayed:,} of {n:,}, duplicates {s.duplicates} (target all, once): {_ok(all_ok)}")
                    if snoop is not None and not math.isnan(snoop.connack_hold.p99):
                        limit = 1.5 * snoop.connack_hold.p99
                        p99 = s.connack_hold.p99
                        line += (f"; CONNACK-hook p99 {_ms(p99)} ms (target ≤ 1.5 × no-op "
                                 f"{_ms(snoop.connack_hold.p99)} = {_ms(limit)} ms): {_ok(p99 <= limit)}")
                    out.append(line)
                if n == 2000:
                    rate = s.rate
                    out.append(f"[14] storm 2,000 clients, {w} worker(s), {t}: restore + replay "
                               f"{_num(rate)} clients/s (target ≥ 300): {_ok(rate is not None and rate >= 300)}")
    return out


def build_report(res: Results, args: argparse.Namespace, *, command: str, date: str, machine: str, settings: str,
                 revision: str, elapsed_s: float) -> str:
    parts = [f"Command: `{command}`  ", f"Date: {date} ({elapsed_s / 60:.1f} minutes)  ", f"Code: {revision}  ",
             f"Machine: {machine}  ", f"Settings: {settings}  "]
    if res.hook_note:
        parts.append(f"Hooks: {res.hook_note}")
    parts.append("")
    targets = res.targets
    for protocol in res.protocols:
        if any(k[0] == protocol for k in res.publish):
            parts += [f"**Publish, ExHook {protocol}**: N clients, each with one `OnMessagePublish` in flight "
                      "(msg/s with % of the no-op; latencies and CPU with the difference to the no-op)", ""]
            parts += _table(["N", "", *targets], _load_rows(res.publish, res, protocol, res.clients, False))
            parts += _bullets(_load_notes(res.publish, protocol))
        if any(k[0] == protocol for k in res.mixed):
            parts += [f"**Mixed publish + acked, ExHook {protocol}**: N publishers (closed loop) and their N "
                      "subscribers, whose `OnMessageAcked` follows each answered publish (closed loop too); msg/s "
                      "= messages acknowledged in the window", ""]
            parts += _table(["N", "", *targets], _load_rows(res.mixed, res, protocol, res.mixed_clients, True))
            parts += _bullets(_load_notes(res.mixed, protocol))
    replay_rows = _replay_rows(res)
    if replay_rows:
        parts += ["**Replay** to a new subscriber through the `publish/bulk` stand-in, which acks each message "
                  "as it is delivered (`OnMessageAcked`, one at a time, as EMQX runs a subscriber's PUBACKs; the "
                  "no-op's ceiling too) (p = the server's answer to each replayed `OnMessagePublish`, on the wire; "
                  "CPU with the difference to the no-op's per call)",
                  ""]
        parts += _table(["protocol", "target", "msg/s", "vs no-op ceiling", "p50 / p99 / p99.9 ms",
                         "server CPU µs/msg", "notes"], replay_rows)
    storm_rows = _storm_rows(res)
    if storm_rows:
        parts += [f"**Reconnect storm** through the EMQX emulator (ExHook {args.storm_protocol}): every client has "
                  "one stored subscription and message, all reconnect at once with a clean session; CONNACK hooks = "
                  "per client, the answer times of the hooks that hold its CONNACK (with the difference to the "
                  "no-op's); CPU in cores over the storm (server / emulator / everything else, e.g. the database): "
                  "an emulator near 1.00 means the emulator, not the server, was the limit", ""]
        parts += _table(["clients", "workers", "target", "restored / replayed", "time to all s", "clients/s",
                         "CONNACK hooks p50 / p99 ms", "CONNACK at client p50 / p99 ms (count)", "failed hook calls",
                         "duplicates", "CPU cores server / emulator / other", "notes"], storm_rows)
    raw_rows = _raw_rows(res, args)
    if raw_rows:
        parts += [f"**Raw backends** from one connection: writes and deletes in batches of {args.batch_size}; one "
                  "commit = a single-row INSERT + COMMIT (Redis: one message's write pipeline), one after the "
                  "other, with the server's durability settings named in the notes", ""]
        parts += _table(["backend", "write msg/s", "delete msg/s", "one commit p50 / p99 ms", "baseline ms", "notes"],
                        raw_rows)
    parts += _spool_section(res, args)
    big_rows = _big_rows(res)
    if big_rows:
        parts += [f"**{args.big_count:,} messages** (`--big`)", ""]
        parts += _table(["service", "publish msg/s, store as the publish phase left it", "publish msg/s, full store",
                         "fill msg/s", "ack all msg/s", "RSS MB: 10k stored+acked → full → all acked", "notes"],
                        big_rows)
    parts += _bullets([_run_notes(r) for r in res.runs], "Servers:")
    parts += _bullets(verdicts(res, args), "Targets (issue 11 = [11], issue 14 = [14]):")
    parts += _bullets(res.skipped, "Skipped:")
    profiles = [line for r in res.runs for line in ([f"## {r.target}/{r.protocol}", *r.profile] if r.profile else [])]
    if profiles:
        parts += ["<details><summary>py-spy profiles (extra phases, not the measured ones)</summary>", "",
                  "```", *profiles, "```", "", "</details>", ""]
    return "\n".join(parts)


def write_benchmarks(path: Path, generated: str) -> None:
    """Replace the generated section of ``path`` (create the file with a header when
    it does not exist or has no markers)."""
    block = f"{BEGIN}\n{generated.rstrip()}\n{END}\n"
    try:
        text = path.read_text()
    except FileNotFoundError:
        text = HEADER
    start, end = text.find(BEGIN), text.find(END)
    if start >= 0 and end > start:
        rest = text[end + len(END):].strip("\n")
        text = text[:start] + block + (f"\n{rest}\n" if rest else "")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)  # a run of minutes must not end in a traceback here
    path.write_text(text)
