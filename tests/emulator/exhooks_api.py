"""EMQX's ExHook management API, ``/api/v5/exhooks`` (the parts ``offline-exhook register`` uses).

Read from emqx/emqx 5.x ``apps/emqx_exhook/src/emqx_exhook_api.erl`` (handlers, status codes),
``emqx_exhook_schema.erl`` (the server config and its defaults) and ``emqx_exhook_mgr.erl``
(``pre_config_update``: add / update / delete of the ``exhook.servers`` list):

* ``GET /exhooks``: 200, the list of servers, each its raw config with the schema's defaults filled
  in (``only_fill_defaults``) merged with ``metrics``, ``node_metrics``, ``node_status``, ``hooks``.
* ``POST /exhooks`` (body = server config): 200 with the new server's detail (older 5.0 releases: 201);
  a name already in the list: 400 ``{"code": "BAD_REQUEST", "message": "Already exists"}``.
* ``GET /exhooks/{name}``: 200 detail | 404 ``{"code": "BAD_REQUEST", "message": "Server not found"}``
  (sic: EMQX's handler answers that code, its swagger spec says NOT_FOUND).
* ``PUT /exhooks/{name}`` (body = the whole server config, which replaces the old one as it is): 200
  detail | 404 ``{"code": "NOT_FOUND", "message": "Server not found"}``.
* ``DELETE /exhooks/{name}``: 204 | 404 ``{"code": "BAD_REQUEST", "message": "Server not found"}``.
* The body is checked against the schema first (minirest): 400 ``BAD_REQUEST`` for a missing ``name``
  or ``url``, a name not matching ``^[A-Za-z0-9]+[A-Za-z0-9-_]*$`` (at most 256 bytes), a wrong type or
  enum value, or an unknown field.

Emulated, not real: the servers live in memory for the life of the REST API and are never connected
(``node_status`` is ``connecting``, ``disabled`` for ``enable = false``; metrics are zero; ``hooks`` is
empty); the emulator's own ExHook connection (its constructor's target) is not in the list; the
``/move`` and ``/hooks`` sub-resources are not served; certificate PEM contents are not written to
files (EMQX does that for PEM text; paths are kept as they are, as EMQX does).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

RestHandler = Callable[[web.Request, Any], Awaitable[tuple[int, Any]]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_NAME = re.compile(r"^[A-Za-z0-9]+[A-Za-z0-9-_]*$")
_DURATION = re.compile(r"^(\d+(ms|s|m|h|d))+$")
SERVER_DEFAULTS: dict[str, Any] = {
    "enable": True,
    "request_timeout": "5s",
    "failed_action": "deny",
    "auto_reconnect": "60s",
    "pool_size": 8,
    "socket_options": {"keepalive": True, "nodelay": True},
}
# the part of emqx_schema:client_ssl_opts_schema the emulator knows (with its defaults)
SSL_DEFAULTS: dict[str, Any] = {
    "enable": False,
    "verify": "verify_none",
    "reuse_sessions": True,
    "depth": 10,
    "secure_renegotiate": True,
    "hibernate_after": "5s",
    "log_level": "notice",
}
_SSL_STRINGS = ("cacertfile", "certfile", "keyfile", "password", "server_name_indication")
_SERVER_FIELDS = {"name", "url", "ssl", *SERVER_DEFAULTS}


class _BadRequest(Exception):
    pass


def _is_duration(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return value >= 0
    return isinstance(value, str) and bool(_DURATION.match(value))


def _check_ssl(ssl: Any) -> dict[str, Any]:
    if not isinstance(ssl, dict):
        raise _BadRequest("ssl: expected an object")
    for key, value in ssl.items():
        if key in ("enable", "reuse_sessions", "secure_renegotiate"):
            if not isinstance(value, bool):
                raise _BadRequest(f"ssl.{key}: expected a boolean")
        elif key == "verify":
            if value not in ("verify_peer", "verify_none"):
                raise _BadRequest("ssl.verify: expected verify_peer or verify_none")
        elif key in _SSL_STRINGS:
            if not isinstance(value, str):
                raise _BadRequest(f"ssl.{key}: expected a string")
        elif key not in SSL_DEFAULTS:
            raise _BadRequest(f"ssl: unknown_fields {key}")
    return {**SSL_DEFAULTS, **ssl}


def check_server_config(body: Any) -> dict[str, Any]:
    """The config EMQX would keep for ``body`` (defaults filled in), or _BadRequest."""
    if not isinstance(body, dict):
        raise _BadRequest("body: expected an object")
    unknown = sorted(set(body) - _SERVER_FIELDS)
    if unknown:
        raise _BadRequest(f"unknown_fields {', '.join(unknown)}")
    for key in ("name", "url"):
        if not isinstance(body.get(key), str):
            raise _BadRequest(f"{key}: required field (a string)")
    name = body["name"]
    if not 0 < len(name.encode()) <= 256:
        raise _BadRequest("name: Name Length must =< 256")
    if not _NAME.match(name):
        raise _BadRequest(f"name: Bad ExHook Name {name!r}, expect \"^[A-Za-z0-9]+[A-Za-z0-9-_]*$\"")
    if "enable" in body and not isinstance(body["enable"], bool):
        raise _BadRequest("enable: expected a boolean")
    if "request_timeout" in body and not _is_duration(body["request_timeout"]):
        raise _BadRequest("request_timeout: expected a duration")
    if "failed_action" in body and body["failed_action"] not in ("deny", "ignore"):
        raise _BadRequest("failed_action: expected deny or ignore")
    reconnect = body.get("auto_reconnect", "60s")
    if reconnect is not False and not _is_duration(reconnect):
        raise _BadRequest("auto_reconnect: expected false or a duration")
    pool = body.get("pool_size", 8)
    if isinstance(pool, bool) or not isinstance(pool, int) or pool < 1:
        raise _BadRequest("pool_size: expected a positive integer")
    if "socket_options" in body and not isinstance(body["socket_options"], dict):
        raise _BadRequest("socket_options: expected an object")
    conf = {**copy.deepcopy(SERVER_DEFAULTS), **copy.deepcopy(body)}
    if "ssl" in body:
        conf["ssl"] = _check_ssl(body["ssl"])
    return conf


class ExhooksApi:
    """The emulated ``exhook.servers`` list and its REST endpoints."""

    def __init__(self, node: str) -> None:
        self.node = node
        self.servers: list[dict[str, Any]] = []

    def route(self, router: web.UrlDispatcher, wrap: Callable[[RestHandler], Handler]) -> ExhooksApi:
        router.add_get("/api/v5/exhooks", wrap(self._list))
        router.add_post("/api/v5/exhooks", wrap(self._add))
        router.add_get("/api/v5/exhooks/{name}", wrap(self._get))
        router.add_put("/api/v5/exhooks/{name}", wrap(self._update))
        router.add_delete("/api/v5/exhooks/{name}", wrap(self._delete))
        return self

    def find(self, name: str) -> dict[str, Any] | None:
        return next((s for s in self.servers if s["name"] == name), None)

    def _detail(self, conf: dict[str, Any]) -> dict[str, Any]:
        metrics = {"succeed": 0, "failed": 0, "rate": 0, "max_rate": 0}
        status = "connecting" if conf.get("enable", True) else "disabled"
        return {
            **copy.deepcopy(conf),
            "metrics": metrics,
            "node_metrics": [{"node": self.node, "metrics": dict(metrics)}],
            "node_status": [{"node": self.node, "status": status}],
            "hooks": [],
        }

    async def _list(self, request: web.Request, body: Any) -> tuple[int, Any]:
        return 200, [self._detail(s) for s in self.servers]

    async def _add(self, request: web.Request, body: Any) -> tuple[int, Any]:
        try:
            conf = check_server_config(body)
        except _BadRequest as exc:
            return 400, {"code": "BAD_REQUEST", "message": str(exc)}
        if self.find(conf["name"]) is not None:
            return 400, {"code": "BAD_REQUEST", "message": "Already exists"}
        self.servers.append(conf)
        return 200, self._detail(conf)

    async def _get(self, request: web.Request, body: Any) -> tuple[int, Any]:
        conf = self.find(request.match_info["name"])
        if conf is None:
            return 404, {"code": "BAD_REQUEST", "message": "Server not found"}
        return 200, self._detail(conf)

    async def _update(self, request: web.Request, body: Any) -> tuple[int, Any]:
        try:
            conf = check_server_config(body)
        except _BadRequest as exc:
            return 400, {"code": "BAD_REQUEST", "message": str(exc)}
        name = request.match_info["name"]
        for i, server in enumerate(self.servers):
            if server["name"] == name:
                self.servers[i] = conf  # replace_conf(Name, fun(_) -> Conf end, ...): the body as it is
                return 200, self._detail(conf)
        return 404, {"code": "NOT_FOUND", "message": "Server not found"}

    async def _delete(self, request: web.Request, body: Any) -> tuple[int, Any]:
        conf = self.find(request.match_info["name"])
        if conf is None:
            return 404, {"code": "BAD_REQUEST", "message": "Server not found"}
        self.servers.remove(conf)
        return 204, None
