"""Runs the console script in-process, as the CLI tests do, or the service as its
own process, as an operator starts it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from exhook.main import main

ROOT = Path(__file__).resolve().parent.parent


def run_cli(argv: list[str]) -> int:
    """``offline-exhook argv...``; its exit status."""
    try:
        main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


@contextmanager
def service_process(config: Path, stderr: int = subprocess.PIPE) -> Iterator[subprocess.Popen[str]]:
    """``python -m exhook --config config``; killed on the way out if it still runs."""
    proc = subprocess.Popen([sys.executable, "-m", "exhook", "--config", str(config)], cwd=ROOT,
                            stderr=stderr, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
