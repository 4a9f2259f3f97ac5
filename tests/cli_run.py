"""Runs the console script in-process, as the CLI tests do."""

from __future__ import annotations

from exhook.main import main


def run_cli(argv: list[str]) -> int:
    """``offline-exhook argv...``; its exit status."""
    try:
        main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0
