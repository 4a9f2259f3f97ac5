"""EMQX's REST API (the parts the service uses), served by aiohttp on 127.0.0.1.

Read from ``emqx_mgmt_api_publish.erl``, ``emqx_mgmt_api_clients.erl``, ``emqx_mgmt.erl`` and
``emqx_dashboard`` (5.x):

* HTTP basic auth with an API key/secret, else 401 ``{"code": "BAD_API_KEY_OR_SECRET", ...}``; an API key with
  the ``publisher`` role may only call ``/publish*`` (403 ``UNAUTHORIZED_ROLE``).
* ``POST /publish`` -> 200 ``{"id"}`` (delivered to at least one route) | 202
  ``{"reason_code": 16, "message": "no_matching_subscribers"}`` | 400 | 503 ``failed_to_dispatch``.
* ``POST /publish/bulk``: the whole array is schema-checked, then every item is turned into a message
  (payload decode, topic name check, size); one bad item -> 400 and nothing is published. Then the messages
  are published in list order, each one a full ``message.publish`` round trip, and delivered as soon as it is
  published. Answer: the list of per-item bodies with 200 (all 200), 202 (some matched no subscriber) or 503.
  An empty array: EMQX's ``messages([]) -> {errror, <<"empty_batch">>}`` (sic) falls through its ``case`` and
  crashes the handler; the emulator answers 400 ``{"code": "BAD_REQUEST", "message": "empty_batch"}``.
  Schema errors -> 400 ``{"code": "BAD_REQUEST", "message": ...}``; a bad topic -> 400
  ``{"reason_code": 144, "message": "topic_name_invalid"}``; bad base64 -> 400 ``{"reason_code": 131, ...}``.
  Messages get ``from = "http_api"``, empty headers, ``properties.user_properties`` as MQTT 5 user properties
  (an Erlang map: sorted by key), the other properties under their MQTT names.
* ``POST /clients/{clientid}/subscribe`` ``{topic, qos, nl, rap, rh}`` and ``/subscribe/bulk`` (array): 404
  ``{"code": "CLIENTID_NOT_FOUND", "message": "Client ID not found"}`` when there is no channel process for
  the clientid (an offline persistent session still has one in EMQX, so it is found); otherwise a
  ``{subscribe, ...}`` message is sent to the channel process (one per item) and the API answers 200 at once
  (``{topic, qos, nl, rap, rh, node, clientid}``, a list for bulk). The channel applies it after whatever it
  is busy with and fires ``session.subscribed``.
* ``/unsubscribe``, ``/unsubscribe/bulk`` (204), ``GET /clients/{clientid}`` and ``.../subscriptions``.
* ``GET /clients`` with the query filters ``conn_state``, ``gte_created_at`` / ``lte_created_at`` and
  ``gte_connected_at`` / ``lte_connected_at`` (epoch milliseconds), paged by ``page`` (from 1) and ``limit``
  (1-10000, default 100): ``{"data": [client, ...], "meta": {"page", "limit", "count", "hasnext"}}``, a client
  as ``GET /clients/{clientid}`` shows it (times as RFC 3339 text). Channels are listed once they are in the
  channel table (registered), in the order their sessions were created.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import functools
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .broker import Channel, Message, SubOpts
from .exhooks_api import ExhooksApi
from .guid import GuidGen
from .topics import TopicError, parse_subscription, validate_name

if TYPE_CHECKING:
    from .broker import EmqxEmulator

MAX_PACKET_SIZE = 1024 * 1024
PROPERTY_NAMES = {
    "payload_format_indicator": "Payload-Format-Indicator",
    "message_expiry_interval": "Message-Expiry-Interval",
    "response_topic": "Response-Topic",
    "correlation_data": "Correlation-Data",
    "content_type": "Content-Type",
}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
CLIENTID_NOT_FOUND = {"code": "CLIENTID_NOT_FOUND", "message": "Client ID not found"}


@dataclass
class RestRequest:
    """One recorded REST request (``path`` relative to ``/api/v5``)."""

    method: str
    path: str
    body: Any
    raw: bytes
    authorized: bool
    started: float
    status: int | None = None
    response: Any = None
    finished: float | None = None

    @property
    def latency(self) -> float | None:
        return None if self.finished is None else self.finished - self.started


_REC = web.RequestKey("emu_rec", RestRequest)


class _Reply(Exception):
    def __init__(self, status: int, body: Any) -> None:
        super().__init__(status)
        self.status = status
        self.body = body


_TIME_FILTERS = ("gte_created_at", "lte_created_at", "gte_connected_at", "lte_connected_at")


def _within(name: str, times: dict[str, int], bound: int) -> bool:
    at = times[name[4:]]
    return at >= bound if name.startswith("gte_") else at <= bound


def _rfc3339(ms: int) -> str:
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC).isoformat(timespec="milliseconds")


def _bad_request(message: str) -> _Reply:
    return _Reply(400, {"code": "BAD_REQUEST", "message": message})


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_publish_schema(item: Any, where: str) -> None:
    """The hocon schema of ``publish_message`` (types, enums, ranges, required fields)."""
    if not isinstance(item, dict):
        raise _bad_request(f"{where}: expected an object")
    for key in ("topic", "payload"):
        if key not in item:
            raise _bad_request(f"{where}.{key} is required")
        if not isinstance(item[key], str):
            raise _bad_request(f"{where}.{key}: expected a string")
    if "qos" in item and not (_is_int(item["qos"]) and 0 <= item["qos"] <= 2):
        raise _bad_request(f"{where}.qos: expected 0, 1 or 2")
    if "retain" in item and not isinstance(item["retain"], bool):
        raise _bad_request(f"{where}.retain: expected a boolean")
    if "payload_encoding" in item and item["payload_encoding"] not in ("plain", "base64"):
        raise _bad_request(f"{where}.payload_encoding: expected plain or base64")
    if "clientid" in item and not isinstance(item["clientid"], str):
        raise _bad_request(f"{where}.clientid: expected a string")
    props = item.get("properties")
    if props is None:
        return
    if not isinstance(props, dict):
        raise _bad_request(f"{where}.properties: expected an object")
    pfi = props.get("payload_format_indicator")
    if pfi is not None and not (_is_int(pfi) and pfi in (0, 1)):
        raise _bad_request(f"{where}.properties.payload_format_indicator: expected 0 or 1")
    mei = props.get("message_expiry_interval")
    if mei is not None and not _is_int(mei):
        raise _bad_request(f"{where}.properties.message_expiry_interval: expected an integer")
    for key in ("response_topic", "correlation_data", "content_type"):
        if key in props and not isinstance(props[key], str):
            raise _bad_request(f"{where}.properties.{key}: expected a string")
    ups = props.get("user_properties")
    if ups is not None:
        # EMQX's schema says map(); non-string values would break the MQTT encoder later, so refuse them
        if not isinstance(ups, dict) or not all(isinstance(v, str) for v in ups.values()):
            raise _bad_request(f"{where}.properties.user_properties: expected an object of strings")


def _erl_binary(value: str) -> str:
    return "<<" + json.dumps(value) + ">>"


def _make_message(item: dict[str, Any], guid: GuidGen) -> Message:
    """``emqx_mgmt_api_publish:make_message``."""
    encoding = item.get("payload_encoding", "plain")
    if encoding == "base64":
        try:
            payload = base64.b64decode(item["payload"], validate=True)
        except (binascii.Error, ValueError):
            raise _Reply(
                400,
                {"reason_code": 131, "message": "{decode_base64_payload_failed," + _erl_binary(item["payload"]) + "}"},
            ) from None
    else:
        payload = item["payload"].encode()
    topic = item["topic"]
    try:
        validate_name(topic)
    except TopicError:
        raise _Reply(400, {"reason_code": 144, "message": "topic_name_invalid"}) from None
    user_props: list[tuple[str, str]] = []
    props: list[tuple[str, str]] = []
    for key, value in (item.get("properties") or {}).items():
        if key == "user_properties":
            user_props = sorted((str(k), str(v)) for k, v in value.items())
        elif key in PROPERTY_NAMES:
            props.append((PROPERTY_NAMES[key], str(value)))
    msg = Message(
        id=guid.gen(),
        qos=item.get("qos", 0),
        from_="http_api",
        topic=topic,
        payload=payload,
        timestamp=time.time_ns() // 1_000_000,
        headers={},
        retain=item.get("retain", False),
        user_props=user_props,
        props=sorted(props, reverse=True),
    )
    if len(payload) + len(topic.encode()) > MAX_PACKET_SIZE:
        raise _Reply(400, {"reason_code": 151, "message": "packet_too_large"})
    return msg


def _sub_opts(item: Any, where: str) -> tuple[str, SubOpts]:
    if not isinstance(item, dict):
        raise _bad_request(f"{where}: expected an object")
    topic = item.get("topic")
    if not isinstance(topic, str):
        raise _bad_request(f"{where}.topic is required")
    qos = item.get("qos", 0)
    if not (_is_int(qos) and 0 <= qos <= 2):
        raise _bad_request(f"{where}.qos: expected 0, 1 or 2")
    opts = {}
    for key in ("nl", "rap", "rh"):
        v = item.get(key, 0)
        if not _is_int(v):
            raise _bad_request(f"{where}.{key}: expected an integer")
        opts[key] = v
    return topic, SubOpts(qos=qos, **opts)


class RestApi:
    def __init__(self, emu: EmqxEmulator, api_key: str, api_secret: str, api_role: str = "administrator") -> None:
        self.emu = emu
        self.api_key = api_key
        self.api_secret = api_secret
        self.api_role = api_role
        self.requests: list[RestRequest] = []
        self.active = 0
        self._runner: web.AppRunner | None = None

    async def start(self, port: int = 0) -> str:
        app = web.Application(middlewares=[self._middleware], client_max_size=16 * 1024 * 1024)
        r = app.router
        h = self._handler
        r.add_post("/api/v5/publish", h(self._publish))
        r.add_post("/api/v5/publish/bulk", h(self._publish_bulk))
        r.add_post("/api/v5/clients/{clientid}/subscribe", h(self._subscribe))
        r.add_post("/api/v5/clients/{clientid}/subscribe/bulk", h(self._subscribe_bulk))
        r.add_post("/api/v5/clients/{clientid}/unsubscribe", h(self._unsubscribe))
        r.add_post("/api/v5/clients/{clientid}/unsubscribe/bulk", h(self._unsubscribe_bulk))
        r.add_get("/api/v5/clients", h(self._list_clients))
        r.add_get("/api/v5/clients/{clientid}", h(self._client_info))
        r.add_get("/api/v5/clients/{clientid}/subscriptions", h(self._client_subscriptions))
        self.exhooks = ExhooksApi(self.emu.node).route(r, h)  # /api/v5/exhooks (exhooks_api.py)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        return f"http://{host}:{port}/api/v5"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ------------------------------------------------------------------ plumbing
    def _authorized(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        if not header.startswith("Basic "):
            return False
        try:
            key, _, secret = base64.b64decode(header[6:]).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return key == self.api_key and secret == self.api_secret

    @staticmethod
    def _json(status: int, out: Any) -> web.Response:
        return web.Response(status=status) if out is None else web.json_response(out, status=status)

    def _handler(self, fn: Callable[[web.Request, Any], Awaitable[tuple[int, Any]]]) -> Handler:
        """Adapt ``fn(request, parsed_body) -> (status, json)`` to an aiohttp handler."""

        async def handle(request: web.Request) -> web.StreamResponse:
            rec = request[_REC]
            try:
                status, out = await fn(request, rec.body)
            except _Reply as reply:
                status, out = reply.status, reply.body
            rec.status, rec.response = status, out
            return self._json(status, out)

        return handle

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        raw = await request.read()
        path = request.path.removeprefix("/api/v5")
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw
        rec = RestRequest(request.method, path, body, raw, self._authorized(request), time.monotonic())
        self.requests.append(rec)
        request[_REC] = rec
        self.active += 1
        try:
            failure: tuple[int, Any] | None = None
            if not rec.authorized:
                failure = 401, {"code": "BAD_API_KEY_OR_SECRET", "message": "Check api_key/api_secret"}
            elif self.api_role == "publisher" and not path.startswith("/publish"):
                failure = 403, {"code": "UNAUTHORIZED_ROLE", "message": "Not allowed for the publisher role"}
            elif raw and isinstance(body, bytes):
                failure = 400, {"code": "BAD_REQUEST", "message": "invalid JSON body"}
            if failure is not None:
                rec.status, rec.response = failure
                return self._json(*failure)
            resp = await handler(request)
            if rec.status is None:
                rec.status = resp.status
            return resp
        finally:
            rec.finished = time.monotonic()
            self.active -= 1

    # ------------------------------------------------------------------ publish
    async def _publish_one(self, msg: Message) -> tuple[int, dict[str, Any]]:
        routes = await self.emu._publish(msg, "rest")
        if not routes:
            return 202, {"reason_code": 16, "message": "no_matching_subscribers"}
        if any(ok for _, ok in routes):
            return 200, {"id": msg.id}
        return 503, {"reason_code": 131, "message": "failed_to_dispatch"}

    async def _publish(self, request: web.Request, body: Any) -> tuple[int, Any]:
        _check_publish_schema(body, "body")
        msg = _make_message(body, GuidGen(self.emu.node))
        return await self._publish_one(msg)

    async def _publish_bulk(self, request: web.Request, body: Any) -> tuple[int, Any]:
        if not isinstance(body, list):
            raise _bad_request("body: expected an array")
        for i, item in enumerate(body):
            _check_publish_schema(item, f"body[{i}]")
        if not body:
            raise _bad_request("empty_batch")
        guid = GuidGen(self.emu.node)  # one request = one process = one id sequence
        messages = [_make_message(item, guid) for item in body]
        results = [await self._publish_one(m) for m in messages]
        codes = {code for code, _ in results}
        status = 200 if codes == {200} else (503 if 503 in codes else 202)
        return status, [out for _, out in results]

    # ------------------------------------------------------------------ clients
    def _sub_info(self, clientid: str, topic: str, opts: SubOpts) -> dict[str, Any]:
        return {
            "topic": topic,
            "qos": opts.qos,
            "nl": opts.nl,
            "rap": opts.rap,
            "rh": opts.rh,
            "node": self.emu.node,
            "clientid": clientid,
        }

    def _post_subscribe(self, clientid: str, topic: str, opts: SubOpts) -> tuple[bool, Any]:
        """``do_subscribe`` for one item: parse, then ``Pid ! {subscribe, [...]}``."""
        try:
            group, _ = parse_subscription(topic)
        except TopicError as exc:
            return False, f"{exc}"
        if group is not None and opts.nl:
            return False, "invalid_subopts_nl"
        ch = self.emu.live_channel(clientid)
        if ch is None:
            return False, "channel_not_found"
        ch.process.post(functools.partial(ch.rest_subscribe, [(topic, opts)]))
        return True, self._sub_info(clientid, topic, opts)

    async def _subscribe(self, request: web.Request, body: Any) -> tuple[int, Any]:
        clientid = request.match_info["clientid"]
        topic, opts = _sub_opts(body, "body")
        ok, out = self._post_subscribe(clientid, topic, opts)
        if ok:
            return 200, out
        if out == "channel_not_found":
            return 404, CLIENTID_NOT_FOUND
        if out == "invalid_subopts_nl":
            return 400, {
                "code": "INVALID_PARAMETER",
                "message": "Invalid Subscribe options: `no_local` not allowed for shared-sub. See [MQTT-3.8.3-4]",
            }
        return 500, {"code": "UNKNOWN_ERROR", "message": str(out)}

    async def _subscribe_bulk(self, request: web.Request, body: Any) -> tuple[int, Any]:
        clientid = request.match_info["clientid"]
        if not isinstance(body, list):
            raise _bad_request("body: expected an array")
        items = [_sub_opts(item, f"body[{i}]") for i, item in enumerate(body)]
        if self.emu.live_channel(clientid) is None:
            return 404, CLIENTID_NOT_FOUND
        succeed: list[Any] = []
        failed: list[Any] = []
        for topic, opts in items:
            ok, out = self._post_subscribe(clientid, topic, opts)
            if ok:
                succeed.append(out)
            else:
                data = [clientid, topic, {"qos": opts.qos, "nl": opts.nl, "rap": opts.rap, "rh": opts.rh}]
                failed.append({"data": data, "reason": str(out)})
        if failed:
            return 200, {"succeed": succeed, "failed": failed}
        return 200, succeed

    async def _unsubscribe(self, request: web.Request, body: Any) -> tuple[int, Any]:
        clientid = request.match_info["clientid"]
        if not isinstance(body, dict) or not isinstance(body.get("topic"), str):
            raise _bad_request("body.topic is required")
        ch = self.emu.live_channel(clientid)
        if ch is None:
            return 404, CLIENTID_NOT_FOUND
        ch.process.post(functools.partial(ch.rest_unsubscribe, [body["topic"]]))
        return 204, None

    async def _unsubscribe_bulk(self, request: web.Request, body: Any) -> tuple[int, Any]:
        clientid = request.match_info["clientid"]
        if not isinstance(body, list) or not all(isinstance(i, dict) and isinstance(i.get("topic"), str) for i in body):
            raise _bad_request("body: expected an array of {topic}")
        ch = self.emu.live_channel(clientid)
        if ch is None:
            return 404, CLIENTID_NOT_FOUND
        ch.process.post(functools.partial(ch.rest_unsubscribe, [i["topic"] for i in body]))
        return 204, None

    async def _list_clients(self, request: web.Request, body: Any) -> tuple[int, Any]:
        q = request.query
        try:
            page, limit = int(q.get("page", "1")), int(q.get("limit", "100"))
            bounds = {name: int(q[name]) for name in _TIME_FILTERS if name in q}
        except ValueError:
            raise _bad_request("page, limit and the *_at filters must be integers") from None
        if page < 1 or not 1 <= limit <= 10_000:
            return 400, {"code": "INVALID_PARAMETER", "message": "page_limit_invalid"}
        state = q.get("conn_state")
        listed = []
        for session in list(self.emu.sessions.values()):
            ch = session.channel
            if session.terminated or ch is None or ch.state == "dead" or not ch.registered:
                continue
            if state is not None and ch.state != state:
                continue
            times = {"created_at": session.created_at_ms, "connected_at": ch.connected_at_ms}
            if all(_within(name, times, at) for name, at in bounds.items()):
                listed.append(ch)
        chunk = listed[(page - 1) * limit:page * limit]
        return 200, {"data": [self._client_view(ch) for ch in chunk],
                     "meta": {"page": page, "limit": limit, "count": len(listed),
                              "hasnext": page * limit < len(listed)}}

    async def _client_info(self, request: web.Request, body: Any) -> tuple[int, Any]:
        clientid = request.match_info["clientid"]
        ch = self.emu.live_channel(clientid)
        if ch is None:
            return 404, CLIENTID_NOT_FOUND
        return 200, self._client_view(ch)

    def _client_view(self, ch: Channel) -> dict[str, Any]:
        clientid = ch.clientid
        return {
            "clientid": clientid,
            "node": self.emu.node,
            "connected": ch.state == "connected",
            "clean_start": ch.client.clean_start,
            "expiry_interval": ch.session.expiry if ch.session else 0,
            "ip_address": "127.0.0.1",
            "port": ch.peerport,
            "username": ch.client.username,
            "proto_ver": ch.client.proto_ver,
            "subscriptions_cnt": len(ch.session.subscriptions) if ch.session else 0,
            "connected_at": _rfc3339(ch.connected_at_ms),
            "created_at": _rfc3339(ch.session.created_at_ms if ch.session else ch.connected_at_ms),
        }

    async def _client_subscriptions(self, request: web.Request, body: Any) -> tuple[int, Any]:
        clientid = request.match_info["clientid"]
        ch = self.emu.live_channel(clientid)
        if ch is None or ch.session is None:
            return 404, CLIENTID_NOT_FOUND
        return 200, [self._sub_info(clientid, t, o) for t, o in ch.session.subscriptions.items()]
