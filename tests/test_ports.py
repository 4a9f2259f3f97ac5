"""The tests' free-port helper: distinct ports, outside the range the OS gives
outgoing connections."""

from __future__ import annotations

from tests.ports import _ephemeral_start, free_port


def test_free_ports_are_distinct_and_below_the_ephemeral_range() -> None:
    # picked one after the other and not bound yet, as a harness picks the service's
    # gRPC port and the REST stand-in's
    ports = [free_port() for _ in range(2_000)]
    assert len(set(ports)) == len(ports)
    assert all(10_000 <= port < _ephemeral_start() for port in ports)
