"""Every command the service sends, and the check at open that the user may send them.

The plugin uses HSET HDEL HGETALL HMSET DEL EXPIRE ZADD ZRANGE ZREMRANGEBYSCORE
ZREM (we write with HSET, not HMSET: the same fields, HSET takes several since
Redis 4). On top of them:

    PING     open() and ping(): liveness
    ZRANGE   (already the plugin's) with BYSCORE/REV/LIMIT/WITHSCORES for paged reads
             and the newest position, with BYLEX for the topic index (Redis >= 6.2)
    ZSCORE   re-key: read the position of the replayed message
    PTTL     re-key: read the remaining TTL of the replayed message ...
    PEXPIRE  ... and give it to the new copy
    EXISTS   re-key: is there a tombstone; topic index clean-up: is a topic's zset gone
    SET      tombstone of a replay's ack (SET key 1 EX n)
    RPUSH    v2 pending-replay registry: register ...
    LPOP     ... and take atomically
    LREM     ... and drop one entry the publishing instance recognised itself
    EVAL     claim_replay (one key: read-compare-raise the marks atomically), and in
             single/sentinel mode the conditional removal of a topic from the topic
             index (two keys); scripts run HGET HSET EXPIRE EXISTS ZREM
    HGET     inside the claim_replay script; re-key: is the new id's key a hash
    SELECT   only when database != 0 (single, sentinel)
    WAIT     only when wait_replicas > 0 (single, sentinel)
    CLUSTER SLOTS  cluster mode only: slot map discovery (redis-py would also send
             ``COMMAND`` to learn key positions; every keyed command here has its key
             first, so the store routes without it)
    SCAN     only ``rebuild_topic_index()`` (a one-off migration tool, not checked at open)
    ZCOUNT   only ``count_messages()`` (operator CLI, not checked at open); a user
             the ACL refuses it counts with paged ZRANGE BYSCORE instead

docs/redis-acl.md has a ready ``ACL SETUSER`` line. ``open()`` runs every command
above on throwaway keys of each key family and names what the user may not run.
"""

from __future__ import annotations

import asyncio
import secrets

from redis.exceptions import NoPermissionError, ResponseError

from storage.base import StoreConfigError
from storage.errors import first_line
from storage.redis.clients import OP_TIMEOUT_S
from storage.redis.errors import ERRORS, wrap
from storage.redis.keys import Cmd, Keys
from storage.redis.link import Link
from storage.redis.scripts import CLAIM_LUA, REMOVE_TOPIC_LUA

PROBE_TAG = b"~ox-probe-"  # in the names of the throwaway keys (a reader scanning {mp}:* skips them)

# Every command the service sends in every set-up (see the module docstring).
REDIS_COMMANDS: tuple[str, ...] = (
    "HSET", "HDEL", "HGETALL", "DEL", "EXPIRE", "ZADD", "ZRANGE", "ZREMRANGEBYSCORE", "ZREM",
    "PING", "ZSCORE", "PTTL", "PEXPIRE", "EXISTS", "SET", "RPUSH", "LPOP", "LREM", "EVAL", "HGET",
)


def _probes(link: Link, keys: Keys, tag: bytes, wait: bool) -> list[tuple[str, Cmd]]:
    """(command, a harmless use of it) on the throwaway keys named by ``tag``."""
    mh, mz, sh = keys.messages + tag, keys.messages + tag + b"-z", keys.subscriptions + tag
    xs, xl = keys.ours + b"probe:" + tag, keys.ours + b"probe:" + tag + b":l"
    xh, xz = keys.ours + b"probe:" + tag + b":h", keys.ours + b"probe:" + tag + b":z"
    probes: list[tuple[str, Cmd]] = [
        ("HSET", ("HSET", mh, b"f", b"v")), ("EXPIRE", ("EXPIRE", mh, 60)),
        ("PEXPIRE", ("PEXPIRE", mh, 60000)), ("PTTL", ("PTTL", mh)), ("HGETALL", ("HGETALL", mh)),
        ("HGET", ("HGET", mh, b"f")),
        ("ZADD", ("ZADD", mz, 1, b"m")), ("EXPIRE", ("EXPIRE", mz, 60)),
        ("ZRANGE", ("ZRANGE", mz, b"-inf", b"+inf", b"BYSCORE", b"LIMIT", 0, 1, b"WITHSCORES")),
        ("ZSCORE", ("ZSCORE", mz, b"m")), ("ZREMRANGEBYSCORE", ("ZREMRANGEBYSCORE", mz, b"-inf", 0)),
        ("ZREM", ("ZREM", mz, b"m")), ("EXISTS", ("EXISTS", mz)),
        ("HSET", ("HSET", sh, b"t", 1)), ("EXPIRE", ("EXPIRE", sh, 60)), ("HGETALL", ("HGETALL", sh)),
        ("HDEL", ("HDEL", sh, b"t")),
        ("SET", ("SET", xs, 1, b"EX", 60)), ("EXISTS", ("EXISTS", xs)),
        ("RPUSH", ("RPUSH", xl, b"x", b"y")), ("EXPIRE", ("EXPIRE", xl, 60)), ("LPOP", ("LPOP", xl)),
        ("LREM", ("LREM", xl, 1, b"y")),
        ("ZADD", ("ZADD", xz, 0, b"t")), ("EXPIRE", ("EXPIRE", xz, 60)),
        ("ZRANGE", ("ZRANGE", xz, b"[t", b"[t\xff", b"BYLEX", b"LIMIT", 0, 1)),
        ("HSET", ("HSET", xh, b"t", b"1")), ("EXPIRE", ("EXPIRE", xh, 60)), ("HGET", ("HGET", xh, b"t")),
        ("EVAL", ("EVAL", CLAIM_LUA, 1, xh, b"probe", 60, b"t", b"1")),
    ]
    if not link.cluster:
        probes.append(("EVAL", ("EVAL", REMOVE_TOPIC_LUA, 2, mz, xz, b"t")))
    if wait:
        probes.append(("WAIT", ("WAIT", 0, 1)))
    probes.append(("ZREM", ("ZREM", xz, b"t")))
    probes += [("DEL", ("DEL", key)) for key in (mh, mz, sh, xs, xl, xh, xz)]
    return probes


async def check_permissions(link: Link, keys: Keys, *, wait: bool) -> None:
    """Run every command the service uses on throwaway keys of each key family;
    raise StoreConfigError naming every command and key pattern refused."""
    cfg = link.cfg
    tag = PROBE_TAG + secrets.token_hex(6).encode()
    families = {keys.messages + tag: f"{cfg.message_key_prefix}:*",
                keys.messages + tag + b"-z": f"{cfg.message_key_prefix}:*",
                keys.subscriptions + tag: f"{cfg.subscription_key_prefix}:*"}
    ours = f"{cfg.message_key_prefix}~ox:*"
    missing: list[str] = []
    denied_keys: list[str] = []
    for name, cmd in _probes(link, keys, tag, wait):
        try:
            async with asyncio.timeout(OP_TIMEOUT_S):
                await link.client.execute_command(*cmd)
        except NoPermissionError as exc:
            if "key" in str(exc).lower():
                family = families.get(cmd[1], ours) if len(cmd) > 1 else ours
                if family not in denied_keys:
                    denied_keys.append(family)
            elif name not in missing:
                missing.append(name)
        except ResponseError as exc:
            if "can't run this command" not in str(exc):
                raise StoreConfigError(f"redis ({link.where}): {name} failed: {first_line(exc)}") from None
            label = f"{name} (its scripts use HGET, HSET, EXPIRE, EXISTS, ZREM)"  # refused inside a script
            if label not in missing:
                missing.append(label)
        except ERRORS as exc:
            raise wrap(exc, f"({link.where}) permission check") from None
    if missing or denied_keys:
        parts = []
        if missing:
            parts.append("may not run " + ", ".join(missing))
        if denied_keys:
            parts.append("may not access keys " + ", ".join(denied_keys))
        raise StoreConfigError(
            f"redis ({link.where}): {link.who} {'; '.join(parts)} (the commands and key patterns the service "
            "needs are in docs/redis-acl.md)"
        )
