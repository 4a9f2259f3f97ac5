"""Console entry point: ``offline-exhook [--config FILE] [COMMAND]``.

Without a command it runs the service (``exhook.runner.run``); the operator commands
(check-config, register, messages, subscriptions, purge, rebuild-topic-index) live in
``exhook/cli/`` and are described in docs/operate.md. Exit status: 0 done, 1 failed,
2 configuration or usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

from exhook.cli.output import CliError, fail
from exhook.cli.parser import parse_args
from exhook.config import Config, ConfigError, backend_name, load_config, usable_cpus
from exhook.config_checks import config_secrets, config_warnings
from exhook.logs import stderr_handler
from exhook.runner import run
from storage.base import StoreConfigError, StoreError

log = logging.getLogger("exhook")


@contextmanager
def _command_logging(cfg: Config) -> Iterator[None]:
    """Warnings of the store drivers on stderr, secrets masked, for one command only:
    the handler goes away afterwards (the caller's own logging, e.g. a test's, stays)."""
    handler = stderr_handler(cfg.service.log_format, config_secrets(cfg))
    handler.setLevel(logging.WARNING)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    if level == logging.NOTSET or level > logging.WARNING:
        root.setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def _print_config(cfg: Config, args: argparse.Namespace) -> int:
    from exhook.cli.effective_config import render

    print(render(cfg, getattr(args, "json", False), args.config))
    for warning in config_warnings(cfg):
        print(f"offline-exhook: warning: {warning}", file=sys.stderr)
    print(f"offline-exhook: {args.config} is valid (backend {backend_name(cfg.backend)})", file=sys.stderr)
    return 0


def with_workers(cfg: Config, workers: int | None) -> Config:
    """``--workers`` over ``exhook.workers``, with the field's meaning: 0 is one per CPU."""
    if workers is None:
        return cfg
    return replace(cfg, service=replace(cfg.service, workers=workers or usable_cpus()))


def _dispatch(cfg: Config, args: argparse.Namespace) -> int:
    command = args.command
    if command == "run":
        return run(with_workers(cfg, args.workers))
    if command == "check-config":
        return _print_config(cfg, args)
    from exhook.cli import register, spooled, stored

    with _command_logging(cfg):
        if command == "register":
            return asyncio.run(register.register(cfg, args))
        if command == "rebuild-topic-index":
            return asyncio.run(stored.rebuild_topic_index(cfg))
        if command == "messages":
            return asyncio.run(stored.messages(cfg, args))
        if command == "subscriptions":
            return asyncio.run(stored.subscriptions(cfg, args))
        if command == "purge":
            return asyncio.run(stored.purge(cfg, args))
        if command == "set-aside":
            return asyncio.run(spooled.set_aside(cfg, args))
        if command == "spool":
            return asyncio.run(spooled.spooled(cfg, args))
    raise AssertionError(f"unknown command {command}")  # the parser only knows the commands above


def cli(argv: list[str] | None = None) -> int:
    """Run one command line; return the exit status."""
    args = parse_args(argv)
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        fail(f"config error: {exc}")
        return 2
    try:
        return _dispatch(cfg, args)
    except CliError as exc:
        fail(str(exc))
        return exc.code
    except StoreConfigError as exc:
        fail(str(exc))
        return 2
    except StoreError as exc:
        fail(str(exc))
        return 1


def main(argv: list[str] | None = None) -> None:
    """The console script. Exits with the command's status (returns normally on 0)."""
    code = cli(argv)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
