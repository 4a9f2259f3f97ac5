"""A restore that waits for a client that left must not hold the pacing's slots from
other clients' work (issue 14). The pacing is the hook logic's, the same on every
backend, so this runs on the default one (SQLite); each case waits out the restores'
full retry of the broker's 404 (~8 s)."""

from __future__ import annotations

import time

import pytest

from tests.e2e.harness import Harness
from tests.e2e.test_scenarios import payloads, publish_all

pytestmark = pytest.mark.parametrize("backend_name", ["sqlite"])


async def test_clients_that_left_during_their_connect_do_not_hold_up_other_clients_work(h: Harness) -> None:
    # Four clients (the pacing's starting slots) lose client.connected and leave at once:
    # each restore waits for its client to be registered, then retries the broker's 404
    # for seconds. Those waits must not keep the slots from an unrelated subscriber's
    # replay (it used to arrive ~8 s late, after they had all given up).
    leavers = [h.client(f"leaver{i}") for i in range(4)]
    for i, leaver in enumerate(leavers):
        await leaver.connect()
        await leaver.subscribe(f"t/leaver{i}", qos=1)
        await leaver.disconnect()
    await publish_all(h, [("t/other", b"for the other")] + [(f"t/leaver{i}", b"away") for i in range(4)])
    await h.settle()
    assert h.emu is not None
    for leaver in leavers:
        h.emu.hooks.fail("client.connected", key=leaver.clientid)
        await leaver.connect()
        await leaver.disconnect()
    other = h.client("other")
    await other.connect()
    started = time.monotonic()
    await other.subscribe("t/other", qos=1)
    await other.wait_for_deliveries(1, timeout=20)
    assert time.monotonic() - started < 3.0
    await h.settle()  # the leavers' restores gave up: nothing of theirs was replayed
    assert payloads(other) == [b"for the other"]
    assert not [i for i in h.bulk_items() if i["topic"].startswith("t/leaver")]
