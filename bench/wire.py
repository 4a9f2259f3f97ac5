"""The server's own answer time, seen on the wire (optional: needs ``tcpdump``).

A Python gRPC client adds ~0.3 ms of its own to every round trip on this machine, so
the round trip the stand-in measures is not the service's answer time. ``tcpdump`` on
the loopback interface timestamps each segment as it is written: on a connection with
one call in flight at a time (the replay's, like EMQX's sequential publish/bulk), the
time from the last request segment (client -> server, >= 100 bytes: the request with
its payload) to the first response segment (server -> client, >= 25 bytes: HEADERS +
DATA + trailers; HTTP/2 PING and WINDOW_UPDATE frames are smaller) is the time the
server took, whatever the client's overhead.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import tempfile
from collections import defaultdict
from pathlib import Path

_LINE = re.compile(r"^(\d+\.\d+) IP 127\.0\.0\.1\.(\d+) > 127\.0\.0\.1\.(\d+): .* length (\d+)$")
MIN_REQUEST = 100
MIN_RESPONSE = 25


def available() -> bool:
    return shutil.which("tcpdump") is not None


class WireTimer:
    """``skip_first``: leave out the connection of the first request captured (the
    replay's subscribe: its connection then carries the subscriber's acks, which must
    not be taken for the replay's publishes)."""

    def __init__(self, server_port: int, skip_first: bool = False) -> None:
        self.port = server_port
        self._skip_first = skip_first
        self._file = Path(tempfile.mkstemp(prefix="bench-wire-", suffix=".txt")[1])
        self._proc: subprocess.Popen[bytes] | None = None
        self.error = ""

    def start(self) -> None:
        exe = shutil.which("tcpdump")
        if exe is None:
            self.error = "tcpdump not installed: apt-get install tcpdump"
            return
        with open(self._file, "wb") as out:
            self._proc = subprocess.Popen(
                [exe, "-i", "lo", "-n", "-tt", "-l", "-B", "8192", "-s", "96",
                 f"tcp port {self.port} and host 127.0.0.1"],
                stdout=out, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)

    def stop(self) -> list[float]:
        """Stop capturing; the server answer times (seconds) on the busiest connection."""
        proc = self._proc
        if proc is None:
            return []
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        try:
            text = self._file.read_text(errors="replace")
        finally:
            with contextlib.suppress(OSError):
                self._file.unlink()
        if proc.returncode not in (0, -15) and not text:
            self.error = f"tcpdump exited with {proc.returncode} (no capture permission?)"
            return []
        return answer_times(text, self.port, self._skip_first)


def answer_times(text: str, server_port: int, skip_first: bool = False) -> list[float]:
    pending: dict[int, float | None] = defaultdict(lambda: None)   # client port -> last request time
    times: dict[int, list[float]] = defaultdict(list)
    skipped: int | None = None
    for line in text.splitlines():
        m = _LINE.match(line.strip())
        if m is None:
            continue
        ts, src, dst, length = float(m.group(1)), int(m.group(2)), int(m.group(3)), int(m.group(4))
        if dst == server_port and length >= MIN_REQUEST:
            if skip_first and skipped is None:
                skipped = src
            if src == skipped:
                continue
            pending[src] = ts
        elif src == server_port and length >= MIN_RESPONSE:
            started = pending[dst]
            if started is not None:
                times[dst].append(ts - started)
                pending[dst] = None
    if not times:
        return []
    return max(times.values(), key=len)
