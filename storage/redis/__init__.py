"""Redis backend (single, sentinel, cluster) in the key layout of the Erlang plugin.

One job per module:

    keys.py         the key layout (the plugin's and ours) and the score = position
    clients.py      redis-py clients per topology: TLS, hiredis packing, cluster routing
    link.py         the open connection: connect/diagnose, one round trip at a time
    permissions.py  every command the service sends; the ACL check at open
    scripts.py      the two Lua scripts
    errors.py       what a failure means: retry, set-up problem, or one op refused
    rounds.py       a pipeline round trip whose replies are read by handle
    ops.py          a batch's ops checked and encoded before the first round trip
    write.py        the write path in phases (saves, acks, re-keys, tombstones)
    reads.py        wildcard discovery, positions, counts, merged paged reads
    bookkeeping.py  replay marks and the v2 pending-replay registry
    purge.py        trimming, topic index clean-up, purge, the one-off index rebuild
    store.py        RedisStore: the Store interface over these parts

docs/redis-acl.md lists the commands and key patterns with a ready ACL user.
"""

from storage.redis.permissions import REDIS_COMMANDS
from storage.redis.store import RedisStore

__all__ = ["REDIS_COMMANDS", "RedisStore"]
