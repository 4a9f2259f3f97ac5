"""Client of EMQX's REST API: publish/bulk for replays, subscribe/bulk for restores,
the list of fresh sessions for the sweep after lost connect calls, and the cheap
authenticated call readiness makes (``check``).

Failures are counted in ``emqx_api_errors_total{endpoint, status}`` with one
vocabulary for ``status``: the HTTP status code when EMQX answered with an error
(``401``, ``403``, ``503``, ...), ``unreachable`` when no connection could be made
and ``timeout`` when no answer came within ``exhook.emqx.request_timeout``.
"""

from __future__ import annotations

import base64
import logging
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
from yarl import URL

from exhook.config import EmqxApiConfig
from exhook.metrics import Metrics
from storage.tls import client_context

log = logging.getLogger(__name__)

REPLAY_PROPERTY = "offline-exhook-replay"
NO_MATCHING_SUBSCRIBERS = 16


UNREACHABLE = "unreachable"
TIMEOUT = "timeout"
# the call readiness makes: authenticated (EMQX's /status is not), cheap, read-only
CHECK_PATH = "/api/v5/exhooks"


class EmqxApiError(Exception):
    """The REST call failed: unreachable, refused, or an error status. ``status`` is
    the HTTP code, or ``"unreachable"`` / ``"timeout"`` when no answer came."""

    def __init__(self, message: str, status: int | str = UNREACHABLE, retryable: bool = True) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable


@dataclass(slots=True, frozen=True)
class ReplayItem:
    """One message to publish again: ``origin`` is the stored message's id."""

    topic: str
    payload: bytes
    qos: int
    origin: str

    def to_json(self) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "payload": base64.b64encode(self.payload).decode("ascii"),
            "payload_encoding": "base64",
            "qos": self.qos,
            # Never retain: a replay must not overwrite the broker's retained message.
            "retain": False,
            "properties": {"user_properties": {REPLAY_PROPERTY: self.origin}},
        }


@dataclass(slots=True, frozen=True)
class BulkResult:
    """What publish/bulk did with each item: ``delivered`` (answered with the id the
    broker gave it: routed to a subscriber), ``unmatched`` (``no_matching_subscribers``)
    and ``failed`` (any other answer, e.g. ``failed_to_dispatch``, or none at all)."""

    status: int
    delivered: int
    unmatched: int
    failed: int = 0

    def __add__(self, other: BulkResult) -> BulkResult:
        return BulkResult(max(self.status, other.status), self.delivered + other.delivered,
                          self.unmatched + other.unmatched, self.failed + other.failed)


@dataclass(slots=True, frozen=True)
class ListedClient:
    """A connected client as ``GET /api/v5/clients`` lists it."""

    clientid: str
    node: str
    peerhost: str
    peerport: int
    subscriptions: int


class EmqxApi:
    def __init__(self, cfg: EmqxApiConfig, metrics: Metrics | None = None) -> None:
        self._cfg = cfg
        self._metrics = metrics
        self._session: aiohttp.ClientSession | None = None
        # the context carries SNI and the name checked when it is not the URL's host; an
        # https:// URL without an ssl block is verified against the system's CAs
        self._ssl: ssl.SSLContext | bool = client_context(cfg.ssl, "exhook.emqx.ssl") if cfg.ssl.enable else True

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            base_url=self._cfg.url,
            headers={"Authorization": basic_auth(self._cfg.api_key, self._cfg.api_secret)},
            timeout=aiohttp.ClientTimeout(total=self._cfg.request_timeout_ms / 1000),
            connector=aiohttp.TCPConnector(limit=64, ssl=self._ssl),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def publish_bulk(self, items: list[ReplayItem]) -> BulkResult:
        if not items:
            raise ValueError("publish_bulk needs at least one item (EMQX mishandles an empty array)")
        status, body = await self._request("POST", "publish/bulk", "/api/v5/publish/bulk",
                                           [item.to_json() for item in items])
        # 503 with one answer per item: EMQX failed to dispatch some (the others went
        # out); any other 503 (a proxy, an overloaded node) is the whole call failing
        per_item = isinstance(body, list) and len(body) == len(items)
        if status not in (200, 202, 503) or (status == 503 and not per_item):
            raise EmqxApiError(f"publish/bulk answered {status}: {_short(body)}", status, status >= 500)
        return bulk_result(status, body, len(items))

    async def subscribe_bulk(self, clientid: str, subscriptions: list[tuple[str, int]]) -> bool:
        """Subscribe a connected client on its behalf. False if it is not connected."""
        body = [{"topic": topic, "qos": qos} for topic, qos in subscriptions]
        return await self._subscribe(clientid, "subscribe/bulk", body)

    async def subscribe(self, clientid: str, topic: str, qos: int) -> bool:
        """Subscribe a connected client to one filter (a restore whose subscribe/bulk
        EMQX refused as a whole). False if it is not connected."""
        return await self._subscribe(clientid, "subscribe", {"topic": topic, "qos": qos})

    async def _subscribe(self, clientid: str, action: str, body: Any) -> bool:
        # encoded by hand, and "." too: a URL library would drop a "." or ".." segment
        path = URL(f"/api/v5/clients/{quote(clientid, safe='').replace('.', '%2E')}/{action}", encoded=True)
        status, answer = await self._request("POST", f"clients/{action}", path, body)
        if status == 404:
            return False
        if status != 200:
            raise EmqxApiError(f"{action} answered {status}: {_short(answer)}", status, status >= 500)
        return True

    async def fresh_sessions(self, since_ms: int, page: int, limit: int) -> tuple[list[ListedClient], bool]:
        """One page of the connected clients whose session was created at or after
        ``since_ms`` (epoch ms), and whether there are more pages."""
        query = urlencode({"conn_state": "connected", "gte_created_at": since_ms, "page": page, "limit": limit})
        status, answer = await self._request("GET", "clients", f"/api/v5/clients?{query}", None)
        if status != 200 or not isinstance(answer, dict) or not isinstance(answer.get("data"), list):
            if status < 400:  # an error status is counted already
                self._count_error("clients", status)
            raise EmqxApiError(f"GET /api/v5/clients answered {status}: {_short(answer)}", status)
        listed = [client for client in map(_listed, answer["data"]) if client is not None]
        meta = answer.get("meta")
        return listed, isinstance(meta, dict) and meta.get("hasnext") is True

    async def check(self) -> str | None:
        """One authenticated read (``GET /api/v5/exhooks``, allowed to the viewer and
        administrator roles): None if EMQX accepted the key, else why not, in one line.
        Not counted in ``emqx_api_errors_total``: the ``emqx_api_up`` gauge shows it."""
        try:
            status, answer = await self._send("GET", CHECK_PATH, None)
        except EmqxApiError as exc:
            return str(exc)
        if status < 400:
            return None
        return refusal(status) or f"{status} from GET {CHECK_PATH}: {_short(answer)}"

    async def _request(self, method: str, endpoint: str, path: str | URL, body: Any) -> tuple[int, Any]:
        """A counted call: failures in ``emqx_api_errors_total{endpoint}``, a refused
        key raised as an error no retry can help."""
        try:
            status, answer = await self._send(method, path, body)
        except EmqxApiError as exc:
            self._count_error(endpoint, exc.status)
            raise
        if status >= 400:
            self._count_error(endpoint, status)
            refused = refusal(status)
            if refused is not None:  # retrying cannot help: the key or its role is wrong
                raise EmqxApiError(f"EMQX API at {self._cfg.url}: {refused}", status, retryable=False)
        return status, answer

    def _count_error(self, endpoint: str, status: int | str) -> None:
        if self._metrics is not None:
            self._metrics.api_error(endpoint, status)

    async def _send(self, method: str, path: str | URL, body: Any) -> tuple[int, Any]:
        if self._session is None:
            raise EmqxApiError("EMQX API client is not started")
        try:
            async with self._session.request(method, path, json=body) as resp:
                return resp.status, await read_answer(resp)
        except aiohttp.ClientError as exc:
            raise EmqxApiError(f"unreachable at {self._cfg.url}: {type(exc).__name__}: {exc}") from exc
        except TimeoutError as exc:
            raise EmqxApiError(f"no answer within {self._cfg.request_timeout_ms} ms at {self._cfg.url}",
                               TIMEOUT) from exc


def bulk_result(status: int, body: Any, sent: int) -> BulkResult:
    """Sort publish/bulk's per-item answers: only an item answered with its id reached
    a subscriber. Anything else but ``no_matching_subscribers`` (``failed_to_dispatch``,
    an unknown answer, a missing one) failed: it was not delivered and stays stored."""
    results = body if isinstance(body, list) else []
    delivered = sum(1 for r in results if isinstance(r, dict) and "id" in r)
    unmatched = sum(
        1 for r in results
        if isinstance(r, dict) and "id" not in r and r.get("reason_code") == NO_MATCHING_SUBSCRIBERS
    )
    return BulkResult(status, delivered, unmatched, max(0, sent - delivered - unmatched))


def _listed(item: Any) -> ListedClient | None:
    """A client entry of ``GET /api/v5/clients``, or None when it is not one."""
    if not isinstance(item, dict) or not isinstance(item.get("clientid"), str):
        return None
    port, subs = item.get("port"), item.get("subscriptions_cnt")
    return ListedClient(item["clientid"], str(item.get("node", "")), str(item.get("ip_address", "")),
                        port if isinstance(port, int) else 0, subs if isinstance(subs, int) else 0)


def refusal(status: int) -> str | None:
    """What a 401 or 403 from EMQX means for this service, or None for other codes."""
    if status == 401:
        return "401 unauthorized (check exhook.emqx.api_key / api_secret)"
    if status == 403:
        return "403 forbidden (the API key needs the administrator role)"
    return None


async def read_answer(resp: aiohttp.ClientResponse) -> Any:
    """EMQX's answer: JSON, or its text when it is not (a proxy's error page)."""
    try:
        return await resp.json(content_type=None)
    except ValueError:
        return await resp.text()


def basic_auth(key: str, secret: str) -> str:
    token = base64.b64encode(f"{key}:{secret}".encode()).decode("ascii")
    return f"Basic {token}"


def _short(body: Any) -> str:
    text = str(body)
    return text if len(text) < 200 else text[:200] + "..."
