"""What one benchmark run measured: plain records, filled by ``bench/run.py`` and turned
into tables and target verdicts by ``bench/report.py``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from bench.common import Latency
from bench.loadgen import PhaseResult
from bench.raw import CommitCost, RawResult
from bench.spool_cost import Recovery, SpoolCost
from bench.storm import StormResult

NOOP = "no-op"


@dataclass
class LoadCell:
    """One closed-loop load measurement: ``publish`` (N publishers) or ``mixed`` (N
    publishers + their N subscribers' acks) of one target, protocol and N."""

    protocol: str
    target: str
    n: int
    phase: PhaseResult
    cpu_us: float            # server CPU per publish call (publish) / per message = publish + ack (mixed)
    server_cores: float
    gen_cores: float
    other_cores: float
    stored_after: int | None = None   # publish: messages the store held after the phase
    drained: str = ""                 # mixed: whether the store got back to where it was

    @property
    def rate(self) -> float:
        return self.phase.rate


@dataclass
class Ceiling:
    """The no-op behind the publish/bulk stand-in: the sequential replay ceiling."""

    protocol: str
    n: int
    rate: float
    cpu_us: float            # no-op CPU per hook call
    answer: Latency          # the stand-in's round trip per hook call
    wire: Latency | None     # the no-op's answer on the wire (tcpdump)


@dataclass
class ReplayResult:
    protocol: str
    target: str
    n: int
    preload_rate: float
    subscribe_ms: float
    delivered: int
    unique: int
    duplicates: int
    in_order: bool
    first_s: float
    last_s: float
    answer: Latency
    wire: Latency | None
    wire_note: str
    projected: float | None   # N / (service-side gaps + Σ wire answer times)
    bulk_calls: int
    cpu_us: float             # server CPU per replayed message, subscribe to last delivery
    complete: bool
    hook_errors: int
    empty_after_acks: str

    @property
    def rate(self) -> float:
        return self.delivered / self.last_s if self.last_s > 0 else float("nan")


@dataclass
class TargetRun:
    """One server process (a target under one protocol) and what it reported."""

    protocol: str
    target: str
    hooks: list[tuple[str, list[str]]] = field(default_factory=list)
    rss_idle: int | None = None
    rss_peak: int | None = None
    rss_end: int | None = None
    counters: dict[str, float] = field(default_factory=dict)
    log_errors: list[str] = field(default_factory=list)
    busy_warning: str = ""
    error: str = ""
    profile: list[str] = field(default_factory=list)
    big: dict[str, Any] = field(default_factory=dict)


@dataclass
class Results:
    protocols: list[str]
    targets: list[str]                         # no-op first (when measured), then the backends
    clients: list[int]
    mixed_clients: list[int]
    storm_sizes: list[int]
    storm_workers: list[int]
    publish: dict[tuple[str, str, int], LoadCell] = field(default_factory=dict)
    mixed: dict[tuple[str, str, int], LoadCell] = field(default_factory=dict)
    ceilings: dict[str, Ceiling] = field(default_factory=dict)
    replays: dict[tuple[str, str], ReplayResult] = field(default_factory=dict)
    storms: dict[tuple[int, int, str], StormResult] = field(default_factory=dict)
    raw: dict[str, RawResult] = field(default_factory=dict)
    commits: dict[str, CommitCost] = field(default_factory=dict)
    spool: SpoolCost | None = None
    recoveries: dict[str, Recovery] = field(default_factory=dict)
    runs: list[TargetRun] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    hook_note: str = ""


def ratio(value: float | None, ceiling: float | None) -> float | None:
    if value is None or not ceiling or math.isnan(ceiling) or math.isnan(value):
        return None
    return value / ceiling
