"""EMQX emulator for the end-to-end tests (test code only; never imported by the product).

It plays the broker towards the service: it speaks ExHook (v2 = ``emqx.exhook.v2``, EMQX 5.0-5.8, or
v3 = ``emqx.exhook.v3``, EMQX 5.9+) as a gRPC *client*, serves EMQX's REST API, and simulates MQTT clients
with their sessions. The EMQX behaviour it reproduces, and where in EMQX's source it was read, is written
in the module docstrings of ``broker.py`` (channels, sessions, dispatch), ``hooks.py`` (ExHook calls) and
``rest.py`` (REST API).

Usage::

    emu = EmqxEmulator(target="127.0.0.1:PORT", version="v3", api_key="k", api_secret="s",
                       pool_size=8, request_timeout=5.0, failed_action="deny", net_delay=0.002)
    await emu.start()                     # REST up (emu.rest_url = "http://127.0.0.1:N/api/v5";
                                          # N = rest_port, or a free port when rest_port=0),
                                          # gRPC pool open, OnProviderLoaded answered (emu.hooks.hookspec)
    c = emu.client("c1", clean_start=True, session_expiry=0, username=None,
                   net_delay=None, auto_ack=True, proto_ver=5)
    present = await c.connect()           # -> CONNACK session_present
    await c.subscribe("t/#", qos=1)       # or c.subscribe([("a", 1), "b"]) -> SUBACK reason codes
    msg_id = await c.publish("t/1", b"x", qos=1, user_props={"k": "v"})
    await c.wait_for_deliveries(1, timeout=5)
    c.deliveries                          # [Delivery(topic, payload, qos, msg_id, retain, user_props, dup, ...)]
    await c.unsubscribe("t/#"); await c.disconnect()   # or c.drop(): lost connection, no DISCONNECT
    await emu.settle()                    # wait until no process, link or hook call is busy
    await emu.stop()                      # (also: async with EmqxEmulator(...) as emu)

``EmqxEmulator(target, version="v3", *, api_key="key", api_secret="secret", api_role="administrator",
rest_port=0, pool_size=8, request_timeout=5.0, failed_action="deny", net_delay=0.002, node="emqx@127.0.0.1",
emqx_version=None, cluster_name="emqxcl", max_inflight=32, max_mqueue_len=1000, mqueue_store_qos0=True,
unload_on_stop=True, ssl=None)``; ``ssl`` is EMQX's ``exhook.servers[].ssl`` block as an :class:`ExHookSsl`
or a mapping (``{"enable": True, "cacertfile": ..., "verify": "verify_peer"}``), see ``hooks.py``.

``emu.client(clientid, *, clean_start=True, session_expiry=0, username=None, net_delay=None, auto_ack=True,
proto_ver=5, keepalive=60, connect_user_props=None) -> EmuClient``. One ``EmuClient`` may connect again after
``disconnect()``; another ``EmuClient`` with the same clientid takes the session over
(``clean_start=False``) or discards it (``clean_start=True``), like a second device would.

Semantics worth knowing:

* Every hook call is made inside the simulated client's own process (a serial mailbox) and awaited: a
  slow hook stalls that client only. ``message.publish`` of a REST message runs in the HTTP request.
* ``net_delay`` is the one-way client<->broker latency. ``connect()`` returns at CONNACK, ``subscribe()``
  at SUBACK, ``publish()`` at PUBACK/PUBCOMP (QoS 0: once the broker processed it) and returns the broker's
  message id, ``disconnect()`` once the broker processed the DISCONNECT. A QoS>0 delivery is acknowledged
  (PUBACK/PUBREC) as soon as the client receives it, so the broker sees the ack one round trip after it
  sent the message; with ``auto_ack=False`` the acks wait in ``c.pending_acks`` until ``c.ack(d)`` /
  ``c.ack_all()``. ``message.acked`` runs in the subscriber's process with the delivered message (its id
  is the published id; its QoS the delivered one); never for QoS 0 deliveries.
* Only the ``message.publish`` answer is applied (IGNORE: unchanged; CONTINUE or STOP_AND_RETURN with a
  ``message``: qos, topic and payload taken from it, ``headers["allow_publish"] == "false"`` drops it;
  any other answer: unchanged, as EMQX logs ``unknown_responsed_value``). ``client.authenticate`` /
  ``client.authorize`` ``bool_result`` are applied too when the service registers them.
* On a timeout or error the call is abandoned; the message is published unchanged either way.

Observation:

* ``emu.calls`` (every gRPC call, :class:`HookCall`: hook, rpc, key, channel, request, response, status,
  latency, answer), ``emu.calls_of(hook)``, ``emu.count(hook)``, ``emu.latencies(hook)``,
  ``emu.hooks.stats``, ``emu.hooks.max_in_flight``.
* ``emu.rest_requests`` (:class:`RestRequest`: method, path, body, status, response, latency),
  ``emu.rest_bodies("/publish/bulk")``, ``emu.bulk_bodies``.
* ``emu.published`` (:class:`PublishRecord`: source, original, msg, answer, routes), ``emu.dropped``,
  ``emu.errors`` (exceptions raised inside emulator processes: assert it stays empty).
* ``emu.sessions``, ``emu.subscriptions(clientid)``, ``emu.routes()``, ``emu.live_channel(clientid)``.
* ``emu.forget_history()`` clears the recorded calls, REST requests, published and dropped messages (the
  broker's state stays); the benchmark's reconnect storm (``bench/storm.py``) uses it between phases.

Failure injection (tests only): ``emu.hooks.fail("client.connected", key="c1", times=1, code="CANCELLED")``
makes the next matching call end with that status without reaching the server, as the calls a saturated
gRPC server rejects do; the broker then carries on as EMQX does (``failed_action`` for the folded hooks).
``emu.register_delay = 0.3`` keeps a new session's channel unregistered (REST: 404) that long after its
``session.created`` returned, as on a loaded broker. ``emu.hooks.answer_late("client.connected", "c1", 0.5)``
makes that client's process get its answers to the hook 0.5 s after the server gave them (it stays in
the hook meanwhile, so a REST subscribe is applied only after it), as on a loaded broker.
"""

from .broker import (
    ConnectRefused,
    Delivery,
    DropRecord,
    EmqxEmulator,
    EmuClient,
    Message,
    PublishRecord,
    Session,
    SubOpts,
)
from .guid import GuidGen, timestamp_us
from .hooks import AVAILABLE_HOOKS, MESSAGE_HOOKS, RPC_OF_HOOK, ExHookSsl, HookCall, HookLoadError, pb_modules
from .rest import RestRequest
from .topics import TopicError, match

__all__ = [
    "AVAILABLE_HOOKS",
    "MESSAGE_HOOKS",
    "RPC_OF_HOOK",
    "ConnectRefused",
    "Delivery",
    "DropRecord",
    "EmqxEmulator",
    "EmuClient",
    "ExHookSsl",
    "GuidGen",
    "HookCall",
    "HookLoadError",
    "Message",
    "PublishRecord",
    "RestRequest",
    "Session",
    "SubOpts",
    "TopicError",
    "match",
    "pb_modules",
    "timestamp_us",
]
