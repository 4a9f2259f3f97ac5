"""A lost connect hook is not a lost client (issue 14): a fresh session is restored from
``session.created`` or ``client.connected``, whichever the service gets first, and only
once. The emulator drops one call the way a saturated gRPC server does (CANCELLED,
never reaching the service) and carries on with the connect, as EMQX does."""

from __future__ import annotations

import pytest

from tests.e2e.harness import Harness
from tests.e2e.test_scenarios import payloads, publish_all

# sqlite (the default), a server each of the other two kinds; v2 and v3 come from the version fixture
pytestmark = pytest.mark.parametrize("backend_name", ["sqlite", "redis", "mysql"])


async def returning_client(h: Harness, clientid: str, topic: str):  # type: ignore[no-untyped-def]
    """A client with a stored subscription that went away with a clean session, and one
    message stored for it meanwhile."""
    sub = h.client(clientid)
    await sub.connect()
    await sub.subscribe(topic, qos=1)
    await sub.disconnect()
    await h.settle()
    await publish_all(h, [(topic, b"while away")])
    return sub


def restores(h: Harness, clientid: str) -> int:
    """subscribe/bulk calls that reached the client (a 404 while the broker had not
    registered it yet, retried, is not a restore)."""
    assert h.emu is not None
    path = f"/clients/{clientid}/subscribe/bulk"
    return sum(1 for r in h.emu.rest_requests if r.path == path and r.status == 200)


def statuses(h: Harness, hook: str, clientid: str) -> list[str]:
    assert h.emu is not None
    return [c.status for c in h.emu.calls_of(hook) if c.key == clientid]


async def reconnect_and_settle(h: Harness, sub) -> None:  # type: ignore[no-untyped-def]
    await sub.connect()
    await sub.wait_for_deliveries(1, timeout=10)
    await h.settle()


async def test_restored_and_replayed_once_when_client_connected_is_lost(h: Harness) -> None:
    sub = await returning_client(h, "no-connected", "t/nc")
    assert h.emu is not None
    h.emu.hooks.fail("client.connected", key="no-connected")
    await reconnect_and_settle(h, sub)
    assert statuses(h, "client.connected", "no-connected")[-1] == "error"
    assert payloads(sub) == [b"while away"]
    assert restores(h, "no-connected") == 1
    assert await h.backend.count_messages() == 0


async def test_restored_and_replayed_once_when_session_created_is_lost(h: Harness) -> None:
    sub = await returning_client(h, "no-created", "t/ns")
    assert h.emu is not None
    h.emu.hooks.fail("session.created", key="no-created")
    await reconnect_and_settle(h, sub)
    assert statuses(h, "session.created", "no-created")[-1] == "error"
    assert statuses(h, "client.connected", "no-created")[-1] == "ok"
    assert payloads(sub) == [b"while away"]
    assert restores(h, "no-created") == 1
    assert await h.backend.count_messages() == 0


async def test_both_connect_hooks_answered_restore_and_replay_once(h: Harness) -> None:
    sub = await returning_client(h, "both", "t/both")
    await reconnect_and_settle(h, sub)
    assert statuses(h, "session.created", "both")[-1] == "ok"
    assert statuses(h, "client.connected", "both")[-1] == "ok"
    assert payloads(sub) == [b"while away"]
    assert restores(h, "both") == 1
    assert len([i for i in h.bulk_items() if i["topic"] == "t/both"]) == 1
    assert await h.backend.count_messages() == 0


async def test_restore_from_session_created_waits_for_the_client_to_be_registered(h: Harness) -> None:
    sub = await returning_client(h, "slow-broker", "t/slow")
    assert h.emu is not None
    h.emu.register_delay = 0.3  # the client is registered 0.3 s after session.created
    await reconnect_and_settle(h, sub)
    answers = [r.status for r in h.emu.rest_requests if r.path == "/clients/slow-broker/subscribe/bulk"]
    assert answers == [200]  # it waited for client.connected: no 404 to retry
    assert payloads(sub) == [b"while away"]


async def test_restore_finds_a_client_registered_late_even_without_client_connected(h: Harness) -> None:
    sub = await returning_client(h, "slow-and-lost", "t/slowlost")
    assert h.emu is not None
    h.emu.register_delay = 1.5  # a broker busy with a storm: seconds before the client is visible...
    h.emu.hooks.fail("client.connected", key="slow-and-lost")  # ...and its client.connected lost
    await reconnect_and_settle(h, sub)
    answers = [r.status for r in h.emu.rest_requests if r.path == "/clients/slow-and-lost/subscribe/bulk"]
    assert answers[0] == 404 and answers[-1] == 200 and answers.count(200) == 1
    assert payloads(sub) == [b"while away"]


async def test_a_restored_subscription_is_replayed_once_when_its_session_subscribed_is_lost(h: Harness) -> None:
    # the restore's subscribe/bulk makes the broker fire session.subscribed; in a storm that
    # call times out and the broker carries on: the client must still get its message, once
    sub = await returning_client(h, "no-subscribed", "t/nsub")
    assert h.emu is not None
    h.emu.hooks.fail("session.subscribed", key="no-subscribed", code="DEADLINE_EXCEEDED")
    await reconnect_and_settle(h, sub)
    assert statuses(h, "session.subscribed", "no-subscribed")[-1] != "ok"
    assert restores(h, "no-subscribed") == 1
    assert payloads(sub) == [b"while away"]
    assert await h.backend.count_messages() == 0


async def test_a_restore_that_outruns_the_broker_applying_its_subscription_replays_once_it_is_applied(
        h: Harness) -> None:
    # the service answers client.connected and restores at once; a loaded broker's client
    # process gets that answer late and applies the REST subscription only after it. The
    # restore waits for the broker's session.subscribed call (the route exists then), so
    # its one replay reaches the client and that call's job replays nothing again.
    sub = await returning_client(h, "outrun", "t/outrun")
    assert h.emu is not None
    h.emu.hooks.answer_late("client.connected", "outrun", 0.5)
    h.emu.hooks.answer_late("session.created", "outrun", 0.5)
    await reconnect_and_settle(h, sub)
    attempts = [i for i in h.bulk_items() if i["topic"] == "t/outrun"]
    assert len(attempts) == 1
    assert payloads(sub) == [b"while away"]
    assert await h.backend.count_messages() == 0


async def test_an_unsubscribe_while_the_restore_waits_is_not_undone(h: Harness) -> None:
    """The restore session.created started waits for the client to be registered
    (longer when client.connected is lost); a filter the client unsubscribes meanwhile
    must not be given back by it, at the broker nor in the store."""
    c = h.client("uns")
    await c.connect()
    await c.subscribe("t/uns", qos=1)
    await c.disconnect()
    await h.settle()
    assert await h.backend.count_subscriptions() == 1
    assert h.emu is not None
    h.emu.hooks.fail("client.connected", key="uns")  # one lost connect hook (a storm's CANCELLED)
    await c.connect()
    await c.subscribe("t/uns", qos=1)
    await c.unsubscribe("t/uns")  # the client drops the subscription for good
    await h.settle()  # the service's queues are idle: the restore has run
    assert "t/uns" not in h.emu.subscriptions("uns")
    assert await h.backend.count_subscriptions() == 0
