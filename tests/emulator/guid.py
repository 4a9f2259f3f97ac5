"""EMQX-like message ids (``emqx_guid``).

Layout (128 bits): ``timestamp`` 64 bits (microseconds) | node id + process id 48 bits | sequence 16 bits,
written as 32 uppercase hex digits (``emqx_guid:to_hexstr``). EMQX keeps the generator state in the publishing
process (each MQTT connection, each REST request); the sequence is incremented on every id and wraps at 0xFFFF.
Here the timestamp is also clamped so that ids of one generator are strictly increasing even when the clock
does not advance between two calls.
"""

from __future__ import annotations

import itertools
import time
import zlib

_MAX_SEQ = 0xFFFF
_pid_counter = itertools.count(0x1000)


def node_id(node: str) -> int:
    """16-bit node part (EMQX derives it from the node name)."""
    return zlib.crc32(node.encode()) & 0xFFFF


class GuidGen:
    """One publisher's id generator."""

    def __init__(self, node: str) -> None:
        self._npid = (node_id(node) << 32) | (next(_pid_counter) & 0xFFFFFFFF)
        self._ts = 0
        self._seq = -1

    def gen(self) -> str:
        now = time.time_ns() // 1000
        if self._seq >= _MAX_SEQ:
            self._seq = 0
            ts = max(now, self._ts + 1)
        else:
            self._seq += 1
            ts = max(now, self._ts)
        self._ts = ts
        value = (ts << 64) | (self._npid << 16) | self._seq
        return f"{value:032X}"


def timestamp_us(guid: str) -> int:
    """The microsecond timestamp in the first 64 bits of an id."""
    return int(guid, 16) >> 64
