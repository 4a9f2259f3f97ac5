"""Shared helpers of the benchmark: the two ExHook protocol generations, EMQX-like ids,
pre-serialised ExHook requests, EMQX's routing of calls over its channel pool, process
accounting (/proc), percentiles, free ports."""

from __future__ import annotations

import math
import os
import socket
import time
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from types import ModuleType
from typing import Any

from exhook.pb.v2 import exhook_pb2 as pb_v2
from exhook.pb.v3 import exhook_pb2 as pb_v3

HOST = "127.0.0.1"
NODE = "emqx@127.0.0.1"
PROTOCOLS = ("v2", "v3")
# the broker generation each ExHook package stands for (v2: EMQX 5.0-5.8, v3: 5.9+)
EMQX_VERSION = {"v2": "5.3.2", "v3": "5.10.4"}
REPLAY_PROPERTY = "offline-exhook-replay"  # the v3 user property that marks a replay (exhook/emqx_api.py)
# ValuedResponse{type: IGNORE} serialises the same in both packages
IGNORE_ANSWER = pb_v3.ValuedResponse(type=pb_v3.ValuedResponse.IGNORE).SerializeToString()
_PLACEHOLDER = b"Z" * 32  # never valid hex, so it cannot occur in a real id

# grpc channel options shared by every client of the benchmark: one TCP connection per
# channel (grpc would otherwise share subchannels between identical channels).
CHANNEL_OPTIONS = [
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]


@dataclass(frozen=True)
class Proto:
    """One ExHook package: ``emqx.exhook.v2`` or ``emqx.exhook.v3`` (same RPCs; v3 adds
    user properties, which is how the service recognises a replay there)."""

    name: str
    pb: ModuleType

    def path(self, rpc: str) -> str:
        """The full gRPC method path, e.g. ``/emqx.exhook.v3.HookProvider/OnMessagePublish``."""
        return f"/emqx.exhook.{self.name}.HookProvider/{rpc}"

    @property
    def meta(self) -> Any:
        return self.pb.RequestMeta(node=NODE, version=EMQX_VERSION[self.name], sysdescr="EMQX",
                                   cluster_name="emqxcl")


@cache
def proto(name: str) -> Proto:
    if name not in PROTOCOLS:
        raise ValueError(f"unknown ExHook protocol {name!r} (expected v2 or v3)")
    return Proto(name, pb_v2 if name == "v2" else pb_v3)


class GuidGen:
    """EMQX-like message ids: 64-bit microsecond timestamp | 48-bit generator tag |
    16-bit sequence, as 32 uppercase hex digits; strictly increasing per generator."""

    __slots__ = ("_seq", "_tag", "_ts")

    def __init__(self, tag: int) -> None:
        self._tag = tag & 0xFFFF_FFFF_FFFF
        self._ts = 0
        self._seq = 0

    def gen(self) -> bytes:
        now = time.time_ns() // 1000
        if now > self._ts:
            self._ts, self._seq = now, 0
        else:
            self._seq += 1
            if self._seq > 0xFFFF:
                self._ts, self._seq = self._ts + 1, 0
        return b"%016X%012X%04X" % (self._ts, self._tag, self._seq)


def payload_bytes(size: int, prefix: bytes = b"") -> bytes:
    """A payload of ``size`` bytes (at least the prefix): printable filler, realistic
    for JSON-ish sensor data, not compressible to nothing."""
    filler = (b"0123456789abcdefghijklmnopqrstuvwxyz" * (size // 36 + 2))[: max(0, size - len(prefix))]
    return prefix + filler


class Template:
    """A serialised request with a 32-byte id placeholder: ``build(id)`` splices in
    an id without going through protobuf on the hot path."""

    __slots__ = ("_post", "_pre")

    def __init__(self, serialised: bytes) -> None:
        at = serialised.find(_PLACEHOLDER)
        if at < 0 or serialised.find(_PLACEHOLDER, at + 1) >= 0:
            raise ValueError("the id placeholder must occur exactly once")
        self._pre = serialised[:at]
        self._post = serialised[at + 32:]

    def build(self, msgid: bytes) -> bytes:
        return self._pre + msgid + self._post


def message(p: Proto, sender: str, topic: str, payload: bytes, qos: int = 1, msgid: str | None = None,
            username: str = "") -> Any:
    """A ``Message`` as EMQX exports it: ``from`` = the publisher's clientid, ``headers`` =
    protocol, peerhost and (when the client has one) username; ``http_api`` messages have none."""
    headers = {} if sender == "http_api" else {"protocol": "mqtt", "peerhost": HOST}
    if username and headers:
        headers["username"] = username
    msg = p.pb.Message(node=NODE, id=msgid or _PLACEHOLDER.decode(), qos=qos, topic=topic, payload=payload,
                       timestamp=time.time_ns() // 1_000_000, headers=headers)
    setattr(msg, "from", sender)
    return msg


def publish_template(p: Proto, sender: str, topic: str, payload: bytes, username: str = "") -> Template:
    req = p.pb.MessagePublishRequest(message=message(p, sender, topic, payload, username=username), meta=p.meta)
    return Template(req.SerializeToString())


def ack_template(p: Proto, subscriber: str, sender: str, topic: str, payload: bytes) -> Template:
    """``message.acked`` carries the message as the broker delivered it (payload included)
    and the subscriber's client info."""
    req = p.pb.MessageAckedRequest(clientinfo=client_info(p, subscriber),
                                   message=message(p, sender, topic, payload, username=sender), meta=p.meta)
    return Template(req.SerializeToString())


def client_info(p: Proto, clientid: str, peerport: int = 50000) -> Any:
    return p.pb.ClientInfo(node=NODE, clientid=clientid, username=clientid, peerhost=HOST, sockport=1883,
                           protocol="mqtt", peerport=peerport)


def route(clientid: str, pool: int) -> int:
    """EMQX picks a pool connection from the clientid (a hash; ``erlang:phash2`` there)."""
    return zlib.crc32(clientid.encode()) % pool


# -- processes ---------------------------------------------------------------------------
def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (worker processes)."""
    children = _children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def rss_bytes(pid: int) -> int:
    """VmRSS summed over ``pid`` and its descendants."""
    total = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return total


_CLK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime summed over ``pid`` and its live descendants."""
    total = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / _CLK


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def busy_seconds() -> float:
    """CPU time all processes of the machine spent so far (/proc/stat, every core)."""
    with open("/proc/stat") as fh:
        fields = [int(v) for v in fh.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / _CLK


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as fh:
            return " ".join(fh.read().split()[:3])
    except OSError:
        return "?"


def machine() -> str:
    cores = os.cpu_count() or 0
    model = ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as fh:
            mem_kb = int(next(line for line in fh if line.startswith("MemTotal:")).split()[1])
    except (OSError, StopIteration):
        mem_kb = 0
    return f"{cores} cores ({model or 'unknown CPU'}), {mem_kb / 1024 / 1024:.1f} GiB RAM"


# -- statistics --------------------------------------------------------------------------
def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (``q`` in 0..100)."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, math.ceil(q / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


@dataclass(slots=True)
class Latency:
    p50: float = float("nan")
    p99: float = float("nan")
    p999: float = float("nan")
    n: int = 0

    @classmethod
    def of(cls, values_s: Iterable[float]) -> Latency:
        values = sorted(values_s)
        return cls(percentile(values, 50) * 1e3, percentile(values, 99) * 1e3,
                   percentile(values, 99.9) * 1e3, len(values))
