"""The service as its own process, as an operator runs it, for the tests whose point is
a real signal: SIGTERM (graceful stop, exit status) and kill -9 (a crash)."""

from __future__ import annotations

import asyncio
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.cli_run import ROOT


class StderrLines:
    """Reads a child's stderr in a thread, so a test waits with a deadline instead of
    blocking on a line that never comes."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, args=(proc,), daemon=True).start()

    def _pump(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, needle: str, count: int = 1, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while sum(needle in line for line in self.seen) < count:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            self.seen.append(line)
        text = "".join(self.seen)
        assert sum(needle in line for line in self.seen) >= count, text
        return text

    def rest(self, timeout: float = 30) -> str:
        """Everything up to the end of the stream (the process has exited)."""
        deadline = time.monotonic() + timeout
        while (line := self.lines.get(timeout=max(0.0, deadline - time.monotonic()))) is not None:
            self.seen.append(line)
        return "".join(self.seen)


def write_config(path: Path, backend_block: str, grpc_port: int, http_port: int, spool: Path,
                 exhook_extra: str = "") -> Path:
    path.write_text(
        f"{backend_block}\n"
        f'exhook {{ listen = "127.0.0.1:{grpc_port}", http {{ listen = "127.0.0.1:{http_port}" }}, '
        f'workers = 1, spool.path = "{spool}", '
        f'emqx {{ api_key = "reliability", api_secret = "reliability-secret-value" }} {exhook_extra} }}\n')
    return path


class ServiceProcess:
    """``python -m exhook --config ...``, started and stopped by the test; the PID
    is the only handle it is stopped by."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.proc: subprocess.Popen[str] | None = None
        self.stderr: StderrLines | None = None
        self.logs: list[str] = []  # stderr of every run that has ended

    def start(self, ready: str = "listening on", timeout: float = 60) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "exhook", "--config", str(self.config)], cwd=ROOT,
                                     stderr=subprocess.PIPE, text=True)
        self.stderr = StderrLines(self.proc)
        self.stderr.wait_for(ready, timeout=timeout)

    def _ended(self) -> int:
        assert self.proc is not None and self.stderr is not None
        code = self.proc.wait(timeout=60)
        self.logs.append(self.stderr.rest())
        self.proc = None
        return code

    def sigterm(self) -> int:
        """SIGTERM; the exit status once it has stopped."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self._ended()

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self._ended()

    async def asigterm(self) -> int:
        return await asyncio.to_thread(self.sigterm)

    async def akill9(self) -> None:
        await asyncio.to_thread(self.kill9)

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()
            self.proc = None


def spool_ops(path: Path) -> int:
    """Write ops waiting in a spool file (0 when there is no file)."""
    if not path.exists():
        return 0
    with sqlite3.connect(path) as conn:
        return int(conn.execute("select count(*) from ops").fetchone()[0])


async def eventually(check: object, timeout: float, what: str, every: float = 0.1) -> None:
    """Poll ``check()`` (sync or async, truthy = done) until it holds or ``timeout``."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        result = check()  # type: ignore[operator]
        last = await result if asyncio.iscoroutine(result) else result
        if last:
            return
        await asyncio.sleep(every)
    raise AssertionError(f"{what}: not within {timeout} s (last: {last!r})")
