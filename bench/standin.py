"""A minimal stand-in for EMQX's REST API, enough to measure replays.

``POST /api/v5/publish/bulk`` behaves like EMQX (``emqx_mgmt_api_publish``): every item
is validated first (one bad item: 400 and nothing is published), then the items are
published in list order, each through ONE ``OnMessagePublish`` gRPC round trip to the
ExHook server (``from = "http_api"``, empty headers, the request's user properties as
v3 ``user_props``; a v2 broker has no such field and drops them), one after the other,
over one connection (EMQX routes every REST message by ``from``); the answer is 200
with ``[{id}]``. A "delivery" is recorded when a message's hook call has answered (EMQX
delivers it then).

``ceiling`` measures what this path allows with a given ExHook server (the no-op): the
benchmark itself posts ``publish/bulk`` batches one after the other, as the service's
replay does, and times the deliveries: the sequential replay ceiling.

``POST /api/v5/clients/{clientid}/subscribe/bulk`` answers 200 (nothing to restore in
the benchmark). Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import grpc
from aiohttp import web

from bench.common import CHANNEL_OPTIONS, HOST, NODE, REPLAY_PROPERTY, GuidGen, Proto, proto


class _BadRequest(Exception):
    pass


@dataclass(slots=True)
class Delivery:
    at: float           # time.monotonic() when the hook answered
    topic: str
    payload: bytes
    msgid: str          # the id this publish got (the subscriber acks this one)
    replay_of: str      # the offline-exhook-replay user property, "" if none


@dataclass
class StandIn:
    grpc_port: int = 0
    port: int = 0
    deliveries: list[Delivery] = field(default_factory=list)
    answer_times: list[float] = field(default_factory=list)   # seconds, one per hook call
    bulk_calls: int = 0
    # (handler entered, answer ready) per publish/bulk request, time.monotonic()
    bulk_spans: list[tuple[float, float]] = field(default_factory=list)
    bad_requests: int = 0
    hook_errors: int = 0
    # called with each delivery as its hook answers (the subscriber's PUBACK follows)
    on_delivery: Callable[[Delivery], None] | None = None
    _expect: int = 0
    _done: asyncio.Event = field(default_factory=asyncio.Event)
    _runner: web.AppRunner | None = None
    _channel: grpc.aio.Channel | None = None
    _call: Any = None
    _gen: GuidGen = field(default_factory=lambda: GuidGen(0xA11))
    _p: Proto = field(default_factory=lambda: proto("v3"))

    async def start(self) -> None:
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_post("/api/v5/publish/bulk", self._publish_bulk)
        app.router.add_post("/api/v5/clients/{clientid}/subscribe/bulk", self._subscribe_bulk)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, HOST, 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def connect(self, grpc_port: int, protocol: str) -> None:
        """(Re)point the hook calls at an ExHook server speaking ``protocol``. One
        connection: EMQX routes every REST-published message by ``from`` = ``http_api``,
        i.e. to one channel."""
        await self.disconnect()
        self.grpc_port = grpc_port
        self._p = proto(protocol)
        self._channel = grpc.aio.insecure_channel(f"{HOST}:{grpc_port}", options=CHANNEL_OPTIONS)
        self._call = self._channel.unary_unary(self._p.path("OnMessagePublish"), None, None)
        await asyncio.wait_for(self._channel.channel_ready(), 30)

    async def disconnect(self) -> None:
        if self._channel is not None:
            await self._channel.close(None)
            self._channel = None

    async def close(self) -> None:
        await self.disconnect()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def reset(self, expect: int) -> None:
        self.deliveries = []
        self.answer_times = []
        self.bulk_spans = []
        self.bulk_calls = self.bad_requests = self.hook_errors = 0
        self._expect = expect
        self._done = asyncio.Event()
        if expect <= 0:
            self._done.set()

    async def wait_delivered(self, timeout: float, stall: float) -> bool:
        """Wait until ``expect`` messages were delivered; give up after ``timeout`` s
        or when nothing was delivered for ``stall`` s."""
        deadline = time.monotonic() + timeout
        seen, since = -1, time.monotonic()
        while not self._done.is_set():
            now = time.monotonic()
            if len(self.deliveries) != seen:
                seen, since = len(self.deliveries), now
            if now >= deadline or now - since >= stall:
                return False
            try:
                await asyncio.wait_for(self._done.wait(), 0.2)
            except TimeoutError:
                pass
        return True

    # -- the sequential hook call ------------------------------------------------------
    def _request(self, topic: str, payload: bytes, qos: int, user_props: dict[str, str]) -> tuple[str, bytes]:
        pb = self._p.pb
        msgid = self._gen.gen().decode()
        msg = pb.Message(node=NODE, id=msgid, qos=qos, topic=topic, payload=payload,
                         timestamp=time.time_ns() // 1_000_000)
        setattr(msg, "from", "http_api")
        req = pb.MessagePublishRequest(message=msg, meta=self._p.meta)
        if self._p.name == "v3":
            req.user_props.extend(pb.Property(name=k, value=v) for k, v in sorted(user_props.items()))
        return msgid, req.SerializeToString()

    async def _hook(self, request: bytes) -> float:
        t0 = time.monotonic()
        await self._call(request, timeout=10)
        return time.monotonic() - t0

    async def ceiling(self, n: int, batch: int, topic: str, payload: bytes) -> float:
        """``n`` messages posted as sequential ``publish/bulk`` batches of ``batch``, the
        way the service replays (base64 payloads, a replay user property per item);
        seconds from the first request to the last delivery."""
        body = base64.b64encode(payload).decode()
        self.reset(n)
        url = f"http://{HOST}:{self.port}/api/v5/publish/bulk"
        t0 = time.monotonic()
        async with aiohttp.ClientSession() as session:
            for start in range(0, n, batch):
                items = [{"topic": topic, "payload": body, "payload_encoding": "base64", "qos": 1,
                          "retain": False, "properties": {"user_properties": {REPLAY_PROPERTY: "0" * 32}}}
                         for _ in range(min(batch, n - start))]
                async with session.post(url, json=items) as resp:
                    await resp.read()
        return (self.deliveries[-1].at if self.deliveries else time.monotonic()) - t0

    # -- REST handlers ---------------------------------------------------------------
    @staticmethod
    def _validate(body: Any) -> list[tuple[str, bytes, int, dict[str, str]]]:
        if not isinstance(body, list) or not body:
            raise _BadRequest("expected a non-empty JSON array")
        items = []
        for item in body:
            if not isinstance(item, dict):
                raise _BadRequest("each item must be an object")
            topic = item.get("topic")
            if not isinstance(topic, str) or not topic or "+" in topic or "#" in topic:
                raise _BadRequest(f"invalid topic {topic!r}")
            qos = item.get("qos", 0)
            if qos not in (0, 1, 2):
                raise _BadRequest(f"invalid qos {qos!r}")
            raw = item.get("payload", "")
            if not isinstance(raw, str):
                raise _BadRequest("payload must be a string")
            encoding = item.get("payload_encoding", "plain")
            if encoding == "base64":
                try:
                    payload = base64.b64decode(raw, validate=True)
                except (binascii.Error, ValueError):
                    raise _BadRequest("payload is not valid base64") from None
            elif encoding == "plain":
                payload = raw.encode()
            else:
                raise _BadRequest(f"unknown payload_encoding {encoding!r}")
            props = item.get("properties") or {}
            user_props = props.get("user_properties") or {} if isinstance(props, dict) else {}
            if not isinstance(user_props, dict):
                raise _BadRequest("user_properties must be an object")
            items.append((topic, payload, int(qos), {str(k): str(v) for k, v in user_props.items()}))
        return items

    async def _publish_bulk(self, request: web.Request) -> web.Response:
        entered = time.monotonic()
        self.bulk_calls += 1
        try:
            items = self._validate(await request.json())
        except (_BadRequest, ValueError) as exc:
            self.bad_requests += 1
            return web.json_response({"code": "BAD_REQUEST", "message": str(exc)}, status=400)
        results = []
        for topic, payload, qos, user_props in items:
            msgid, req = self._request(topic, payload, qos, user_props)
            try:
                elapsed = await self._hook(req)
            except grpc.aio.AioRpcError:
                # EMQX applies failed_action and publishes the message anyway
                self.hook_errors += 1
                elapsed = float("nan")
            self.answer_times.append(elapsed)
            delivery = Delivery(time.monotonic(), topic, payload, msgid, user_props.get(REPLAY_PROPERTY, ""))
            self.deliveries.append(delivery)
            if self.on_delivery is not None:
                self.on_delivery(delivery)
            results.append({"id": msgid})
        if len(self.deliveries) >= self._expect:
            self._done.set()
        self.bulk_spans.append((entered, time.monotonic()))
        return web.json_response(results, status=200)

    def service_gaps(self, since: float) -> float:
        """Seconds between ``since`` and the first publish/bulk request plus between the
        answer to one request and the next: time the replaying service spent on its own
        side (reading the store, building the next request)."""
        total, last = 0.0, since
        for entered, answered in sorted(self.bulk_spans):
            total += max(0.0, entered - last)
            last = answered
        return total

    async def _subscribe_bulk(self, request: web.Request) -> web.Response:
        body = await request.json()
        if not isinstance(body, list):
            return web.json_response({"code": "BAD_REQUEST"}, status=400)
        clientid = request.match_info["clientid"]
        return web.json_response([{"clientid": clientid, **item} for item in body if isinstance(item, dict)])
