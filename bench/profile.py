"""py-spy profiles of the service under load, summarised per message.

``Profiler`` samples a running process tree (non-blocking, so the measured process is
not paused) into py-spy's "raw" collapsed-stack format and, next to it, a flame graph
SVG. ``summarize`` turns the raw file into the top self and inclusive costs, in
microseconds of sampled (non-idle) time per message.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

RATE = 250


def pyspy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    if local.exists():
        return str(local)
    return shutil.which("py-spy")


class Profiler:
    def __init__(self, pid: int, out_dir: Path, name: str, subprocesses: bool, native: bool) -> None:
        exe = pyspy()
        if exe is None:
            raise RuntimeError("py-spy is not installed (.venv/bin/pip install py-spy)")
        out_dir.mkdir(parents=True, exist_ok=True)
        self.raw = out_dir / f"{name}.txt"
        self.svg = out_dir / f"{name}.svg"
        self.log = out_dir / f"{name}.log"
        common = [exe, "record", "--pid", str(pid), "--rate", str(RATE), "--nolineno"]
        if subprocesses:
            common.append("--subprocesses")
        # --native needs to pause the process for each sample (it slows the profiled phase,
        # which is not one of the measured phases); plain sampling does not pause it
        common.append("--native" if native else "--nonblocking")
        self._procs: list[subprocess.Popen[bytes]] = []
        with open(self.log, "wb") as log:
            for fmt, out in (("raw", self.raw), ("flamegraph", self.svg)):
                self._procs.append(subprocess.Popen([*common, "--format", fmt, "--output", str(out)],
                                                    stdin=subprocess.DEVNULL, stdout=log, stderr=log))

    def stop(self) -> None:
        """py-spy writes its output on SIGINT."""
        for proc in self._procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGINT)
        for proc in self._procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*)\)$")


def _frame(text: str) -> tuple[str, str]:
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    m = _FRAME.match(text.strip())
    if m is None:
        return text.strip(), ""
    return m.group("func"), m.group("file")


def _module(func: str, file: str) -> str:
    """A coarse owner of a frame's self time."""
    f = file.replace("\\", "/")
    if func == "Runner.run" or (func == "run" and f.endswith("uvloop/__init__.py")):
        # nothing Python runs below it: the event loop's C code (uvloop) and what it calls
        # without a Python frame (grpc.aio's Cython call handling, protobuf's C parser)
        return "event loop C code (uvloop + grpc Cython + protobuf C)"
    if func == "Thread.run" and f.endswith("threading.py"):
        return "thread C code (grpc poller; sqlite3 calls in the store's threads)"
    for marker, label in (("exhook/", "exhook/ (service)"), ("storage/", "storage/ (service)"),
                          ("grpc/", "grpc (Python part)"), ("redis/", "redis-py"), ("aiomysql/", "aiomysql"),
                          ("pymysql/", "PyMySQL"), ("google/protobuf", "protobuf"),
                          ("asyncio/", "asyncio (Python part)"), ("concurrent/", "threads (Python part)"),
                          ("threading", "threads (Python part)")):
        if marker in f:
            return label
    return "other"


def summarize(raw: Path, messages: int, cpu_us_per_msg: float | None, top: int = 15) -> list[str]:
    """Lines of text: where the sampled time goes, per module and per function, as a
    share of the samples and, scaled to the server CPU measured over the same phase,
    as microseconds of CPU per message."""
    self_t: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    mod_self: Counter[str] = Counter()
    total = 0
    try:
        text = raw.read_text(errors="replace")
    except OSError:
        return [f"(no profile: {raw} missing)"]
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame(f) for f in stack.split(";") if f]
        frames = [f for f in frames if f[1]]  # drop process / thread labels
        if not frames:
            continue
        total += count
        func, file = frames[-1]
        self_t[f"{func} ({file})"] += count
        mod_self[_module(func, file)] += count
        for key in {f"{fn} ({fl})" for fn, fl in frames if "exhook/" in fl or "storage/" in fl}:
            incl[key] += count
    if total == 0 or messages <= 0:
        return [f"(profile {raw.name}: no samples)"]
    scale = cpu_us_per_msg if cpu_us_per_msg else total / RATE / messages * 1e6

    def us(samples: int) -> str:
        return f"{scale * samples / total:6.1f} us/msg {100 * samples / total:5.1f}%"

    out = [f"{raw.name}: {total} samples at {RATE} Hz, {messages:,} messages, server CPU "
           f"{'-' if cpu_us_per_msg is None else f'{cpu_us_per_msg:.0f}'} us/msg "
           "(us/msg below = share of the samples x that CPU)"]
    out.append("  self time by owner:")
    out += [f"    {us(n)}  {name}" for name, n in mod_self.most_common()]
    out.append("  self time by function:")
    out += [f"    {us(n)}  {name}" for name, n in self_t.most_common(top)]
    if incl:
        out.append("  inclusive time of the service's own functions (exhook/, storage/):")
        out += [f"    {us(n)}  {name}" for name, n in incl.most_common(top)]
    return out
