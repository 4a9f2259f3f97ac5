"""Free loopback ports for the servers the tests start (the service, private
redis-server and mariadbd processes, REST stand-ins)."""

from __future__ import annotations

import random
import socket
from pathlib import Path

_LOWEST = 10_000
# every port handed out in this process: two picks in a row are not bound yet, so a
# bind check alone would let the second repeat the first (and a port a stopped server
# left in TIME_WAIT is better not reused in the same run)
_handed_out: set[int] = set()


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def bindable(port: int) -> bool:
    """Whether 127.0.0.1:``port`` can be bound now."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A loopback port that is free now, below the kernel's ephemeral range: a port the
    OS hands out from that range (bind to port 0) can be taken by an outgoing
    connection before the server binds it, which once failed a CI run."""
    top = max(_ephemeral_start(), _LOWEST + 1_000)
    for _ in range(500):
        port = random.randrange(_LOWEST, top)
        if port not in _handed_out and bindable(port):
            _handed_out.add(port)
            return port
    raise RuntimeError(f"no free loopback port between {_LOWEST} and {top}")
