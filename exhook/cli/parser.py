"""The command line: ``offline-exhook [--config FILE] [COMMAND] [options]``.

Without a command the service runs (as ``run``), so ``offline-exhook --config X`` keeps
working; the old flags ``--check-config`` and ``--rebuild-topic-index`` still work as
aliases of their commands. ``--config`` is accepted before or after the command.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from exhook.buildinfo import version_line
from exhook.cli.register import DEFAULT_NAME
from exhook.config import MAX_WORKERS

COMMANDS = ("run", "check-config", "register", "messages", "subscriptions", "purge", "rebuild-topic-index",
            "set-aside", "spool")


def _config_option(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument("--config", default=default, metavar="FILE",
                        help="HOCON config file (default: $OFFLINE_EXHOOK_CONFIG or config.hocon)")


def _workers_option(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument("--workers", type=_worker_count, default=default,
                        help=f"override exhook.workers (processes sharing the port; 0: one per CPU, "
                             f"at most {MAX_WORKERS})")


def _worker_count(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= count <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"{count} is out of range (0: one per CPU, 1-{MAX_WORKERS})")
    return count


def _output_options(parser: argparse.ArgumentParser, progress: bool = True) -> None:
    parser.add_argument("--json", action="store_true", help="one JSON document instead of tab-separated lines")
    if progress:
        parser.add_argument("--quiet", "-q", action="store_true", help="no progress lines on stderr")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="offline-exhook",
        description="Offline messages for EMQX through ExHook. Without a command: run the service.",
        epilog="The operator's guide is docs/operate.md.",
    )
    parser.add_argument("--version", action="version", version=version_line())
    _config_option(parser, os.environ.get("OFFLINE_EXHOOK_CONFIG", "config.hocon"))
    _workers_option(parser, None)
    parser.add_argument("--check-config", action="store_true", help="the same as the check-config command")
    parser.add_argument("--rebuild-topic-index", action="store_true",
                        help="the same as the rebuild-topic-index command")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # A subcommand's own default would overwrite a --config given before the command:
    # SUPPRESS keeps the main parser's value unless the option is repeated after it.
    keep = argparse.SUPPRESS

    run = sub.add_parser("run", help="run the service (the default)")
    _config_option(run, keep)
    _workers_option(run, keep)

    check = sub.add_parser("check-config", help="validate the config, print it with defaults and secrets masked")
    _config_option(check, keep)
    check.add_argument("--json", action="store_true", help="print JSON instead of HOCON")

    _register_parser(sub, keep)
    _store_parsers(sub, keep)
    rebuild = sub.add_parser("rebuild-topic-index",
                             help="Redis: index the topics of a store written by the Erlang plugin "
                                  "(needed once for wildcard replays after a migration)")
    _config_option(rebuild, keep)
    return parser


def _register_parser(sub: Any, keep: Any) -> None:
    reg = sub.add_parser("register", help="add or update this service in EMQX (POST/PUT /api/v5/exhooks)")
    _config_option(reg, keep)
    reg.add_argument("--name", default=DEFAULT_NAME, help=f"exhook server name in EMQX (default {DEFAULT_NAME})")
    reg.add_argument("--url", help="how EMQX reaches this service, e.g. http://offline-exhook:9000 "
                                   "(default: this host and the port of exhook.listen)")
    reg.add_argument("--request-timeout", metavar="DURATION",
                     help="EMQX's call timeout (default: the config's exhook.emqx.hook_timeout, 5s unless set)")
    # ignore: a service that is down or slow must not make EMQX deny the hook chain's later servers
    reg.add_argument("--failed-action", choices=("deny", "ignore"), default="ignore",
                     help="what EMQX does when a call fails (default ignore)")
    reg.add_argument("--pool-size", type=int, default=8, help="gRPC connections per EMQX node (default 8)")
    reg.add_argument("--auto-reconnect", default="10s", metavar="DURATION",
                     help="how soon EMQX retries loading the service after a failure, or false (default 10s)")
    tls = reg.add_argument_group("TLS (exhook.ssl.enable = true; paths as EMQX sees them)")
    tls.add_argument("--ssl-cacertfile", help="CA EMQX verifies the service's certificate with")
    tls.add_argument("--ssl-certfile", help="EMQX's client certificate (required with exhook.ssl.verify_peer)")
    tls.add_argument("--ssl-keyfile", help="its key")
    tls.add_argument("--ssl-server-name", help="server name EMQX sends (SNI) and checks the certificate for")


def _store_parsers(sub: Any, keep: Any) -> None:
    """The commands that look into the store and the spool."""
    msgs = sub.add_parser("messages", help="list stored messages of a topic filter and count them per topic")
    _config_option(msgs, keep)
    msgs.add_argument("--topic", required=True, metavar="FILTER", help="topic filter, wildcards allowed")
    msgs.add_argument("--limit", type=int, default=100, help="messages listed at most (default 100, 0 = all)")
    msgs.add_argument("--count", action="store_true", help="only the counts per topic")
    _output_options(msgs)

    subs = sub.add_parser("subscriptions", help="a client's stored subscriptions")
    _config_option(subs, keep)
    subs.add_argument("clientid")
    _output_options(subs, progress=False)

    purge = sub.add_parser("purge", help="delete stored messages of a topic filter (a dry run without --yes)")
    _config_option(purge, keep)
    purge.add_argument("--topic", required=True, metavar="FILTER", help="topic filter, wildcards allowed")
    purge.add_argument("--yes", action="store_true", help="really delete (without it: only count)")
    _output_options(purge)

    aside = sub.add_parser("set-aside", help="write ops the store refused for good (kept in the spool file)")
    _config_option(aside, keep)
    aside.add_argument("--limit", type=int, default=100, help="newest ops listed at most (default 100)")
    _output_options(aside, progress=False)

    spool = sub.add_parser("spool", help="write ops waiting in the local spool for the store")
    _config_option(spool, keep)
    spool.add_argument("--list", action="store_true", help="also list the oldest waiting ops")
    spool.add_argument("--limit", type=int, default=100, help="ops listed at most per file (default 100)")
    _output_options(spool, progress=False)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.command is None:  # the old flags
        args.command = "rebuild-topic-index" if args.rebuild_topic_index else (
            "check-config" if args.check_config else "run")
    return args
