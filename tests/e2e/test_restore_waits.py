"""A restore replays a filter once the broker's ``session.subscribed`` call for it has
arrived (exhook/subscribed_calls.py; test_restore_once.py sees the one replay when the
broker applies the subscription late). This is the fallback: when that call is lost the
restore replays anyway after its wait, and tries again while its replay reaches nobody.
The logic is the hook layer's, the same on every backend, so this runs on the default
one (SQLite)."""

from __future__ import annotations

import pytest

from exhook.hooks import SUBSCRIBED_WAIT_S
from tests.e2e.harness import Harness
from tests.e2e.test_restore_once import reconnect_and_settle, returning_client, statuses
from tests.e2e.test_scenarios import payloads

pytestmark = pytest.mark.parametrize("backend_name", ["sqlite"])


async def test_a_restore_whose_call_is_lost_and_whose_subscription_is_applied_late_still_replays_once(
        h: Harness) -> None:
    # the client's process gets client.connected's answer after the restore's wait for
    # the (lost) session.subscribed call is over: the first replay reaches nobody, the
    # next, once the subscription is applied, reaches the client
    sub = await returning_client(h, "late-and-lost", "t/latelost")
    assert h.emu is not None
    late = SUBSCRIBED_WAIT_S + 1.0
    h.emu.hooks.answer_late("client.connected", "late-and-lost", late)
    h.emu.hooks.answer_late("session.created", "late-and-lost", late)
    h.emu.hooks.fail("session.subscribed", key="late-and-lost", code="DEADLINE_EXCEEDED")
    await reconnect_and_settle(h, sub)
    assert statuses(h, "session.subscribed", "late-and-lost")[-1] != "ok"
    attempts = [i for i in h.bulk_items() if i["topic"] == "t/latelost"]
    assert len(attempts) >= 2  # the first went to nobody
    assert payloads(sub) == [b"while away"]
    assert await h.backend.count_messages() == 0
