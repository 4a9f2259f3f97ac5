"""register: add this service to a running EMQX as an ExHook server, idempotently.

EMQX's REST API (``apps/emqx_exhook/src/emqx_exhook_api.erl``, 5.x), reached with the
config's ``exhook.emqx`` block (api_url, api_key/api_secret as HTTP basic auth, ssl):

* ``GET /api/v5/exhooks/{name}``: 200 the server's config (defaults filled in) plus status
  and metrics; 404 ``Server not found`` (EMQX before 5.0.x answered 400);
* ``POST /api/v5/exhooks`` body = the server config (``emqx_exhook_schema:server_config``:
  name, enable, url, request_timeout, failed_action, ssl, socket_options, auto_reconnect,
  pool_size): 200 (older: 201); a name that exists: 400 ``Already exists``;
* ``PUT /api/v5/exhooks/{name}`` with the whole config: 200; 404 if there is none.

So: GET; if absent POST; if present with other settings PUT; if the same, nothing. A POST
that races another registration (400 Already exists) is followed by a PUT. Settings are
compared field by field as EMQX keeps them (durations parsed, unset TLS fields as EMQX's
defaults), only the fields this command sets.
"""

from __future__ import annotations

import argparse
import re
import socket
import sys
import urllib.parse
from dataclasses import dataclass
from typing import Any

import aiohttp

from exhook.cli.output import CliError
from exhook.config import Config, EmqxApiConfig
from exhook.emqx_api import basic_auth, read_answer
from exhook.units import format_duration, parse_duration_ms
from storage.tls import client_context

DEFAULT_NAME = "offline-exhook"
_NAME = re.compile(r"^[A-Za-z0-9]+[A-Za-z0-9_-]*$")  # emqx_exhook_schema:validate_name/1
# EMQX's defaults for the TLS fields this command may set (emqx_schema client_ssl_opts)
_SSL_DEFAULTS: dict[str, Any] = {"enable": False, "verify": "verify_none", "cacertfile": "", "certfile": "",
                                 "keyfile": "", "server_name_indication": ""}


def emqx_duration_ms(value: Any) -> int | None:
    """A duration as EMQX's API shows or takes it (``"5s"``, ``"1m30s"``, an integer of
    ms); None if it is not one."""
    try:
        return parse_duration_ms(value)
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class Exhook:
    """The exhook server entry this command wants EMQX to have."""

    name: str
    url: str
    request_timeout_ms: int
    failed_action: str
    pool_size: int
    auto_reconnect_ms: int | None  # None = false (never reconnect)
    ssl: dict[str, Any]

    def body(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "enable": True,
            "url": self.url,
            "request_timeout": format_duration(self.request_timeout_ms),
            "failed_action": self.failed_action,
            "auto_reconnect": False if self.auto_reconnect_ms is None else format_duration(self.auto_reconnect_ms),
            "pool_size": self.pool_size,
            "ssl": self.ssl,
        }

    def differences(self, current: dict[str, Any]) -> list[str]:
        """Names of the settings in which EMQX's ``current`` entry differs."""
        diffs = []
        if current.get("enable", True) is not True:
            diffs.append("enable")
        if current.get("url") != self.url:
            diffs.append("url")
        if emqx_duration_ms(current.get("request_timeout", "5s")) != self.request_timeout_ms:
            diffs.append("request_timeout")
        if current.get("failed_action", "deny") != self.failed_action:
            diffs.append("failed_action")
        if current.get("pool_size", 8) != self.pool_size:
            diffs.append("pool_size")
        reconnect = current.get("auto_reconnect", "60s")
        reconnect_ms = None if reconnect in (False, "false") else emqx_duration_ms(reconnect)
        if reconnect_ms != self.auto_reconnect_ms:
            diffs.append("auto_reconnect")
        have = current.get("ssl") or {}
        if bool(have.get("enable", False)) != bool(self.ssl.get("enable")):
            diffs.append("ssl.enable")
        elif self.ssl.get("enable"):
            for key in ("verify", "cacertfile", "certfile", "keyfile", "server_name_indication"):
                if (have.get(key) or _SSL_DEFAULTS[key]) != self.ssl.get(key, _SSL_DEFAULTS[key]):
                    diffs.append(f"ssl.{key}")
        return diffs


def _default_url(cfg: Config) -> str:
    listen = cfg.service.listen
    host = listen.host
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()  # a wildcard address is no address to connect to
    scheme = "https" if cfg.service.ssl.enable else "http"
    return f"{scheme}://[{host}]:{listen.port}" if ":" in host else f"{scheme}://{host}:{listen.port}"


def desired_exhook(cfg: Config, args: argparse.Namespace) -> Exhook:
    """The entry from the options and the config; CliError (exit 2) on a bad combination."""
    if not _NAME.match(args.name) or len(args.name) > 256:
        raise CliError(f"--name: {args.name!r} is not an EMQX exhook name (letters, digits, - and _; "
                       "starting with a letter or digit)", 2)
    tls = cfg.service.ssl
    url = (args.url or _default_url(cfg)).rstrip("/")
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ("http", "https") or not urllib.parse.urlsplit(url).netloc:
        raise CliError(f"--url: expected http://host:port or https://host:port, got {url!r}", 2)
    if tls.enable and scheme != "https":
        raise CliError("--url: the service listens with TLS (exhook.ssl.enable = true): use https://", 2)
    if not tls.enable and scheme == "https":
        raise CliError("--url: the service listens without TLS (exhook.ssl.enable = false): use http://", 2)
    given = {key: getattr(args, f"ssl_{key}") or "" for key in ("cacertfile", "certfile", "keyfile")}
    sni = args.ssl_server_name or ""
    if not tls.enable and (any(given.values()) or sni):
        raise CliError("--ssl-*: the service listens without TLS (exhook.ssl.enable = false)", 2)
    if bool(given["certfile"]) != bool(given["keyfile"]):
        raise CliError("--ssl-certfile and --ssl-keyfile go together", 2)
    if tls.enable and tls.verify_peer and not given["certfile"]:
        raise CliError("exhook.ssl.verify = verify_peer: EMQX must present a client certificate: "
                       "give --ssl-certfile and --ssl-keyfile (paths as EMQX sees them)", 2)
    ssl: dict[str, Any] = {"enable": tls.enable}
    if tls.enable:
        # with a CA EMQX checks the service's certificate; without one it cannot
        ssl["verify"] = "verify_peer" if given["cacertfile"] else "verify_none"
        ssl.update({key: value for key, value in given.items() if value})
        if sni:
            ssl["server_name_indication"] = sni
    hook_timeout = cfg.service.emqx.hook_timeout_ms
    timeout = hook_timeout if args.request_timeout is None else emqx_duration_ms(args.request_timeout)
    if timeout is None or timeout <= 0:
        raise CliError(f"--request-timeout: expected a duration such as 5s, got {args.request_timeout!r}", 2)
    reconnect = None if args.auto_reconnect == "false" else emqx_duration_ms(args.auto_reconnect)
    if args.auto_reconnect != "false" and (reconnect is None or reconnect <= 0):
        raise CliError(f"--auto-reconnect: expected a duration such as 60s or false, got {args.auto_reconnect!r}", 2)
    if args.pool_size < 1:
        raise CliError("--pool-size: must be at least 1", 2)
    return Exhook(args.name, url, timeout, args.failed_action, args.pool_size, reconnect, ssl)


class EmqxAdmin:
    """A few REST calls with the config's credentials; every failure is one CliError line."""

    def __init__(self, cfg: EmqxApiConfig) -> None:
        self._cfg = cfg
        # without an ssl block an https:// URL is verified against the system's CAs (True):
        # False would send the API secret to whoever answers
        ssl = client_context(cfg.ssl, "exhook.emqx.ssl") if cfg.ssl.enable else True
        self._session = aiohttp.ClientSession(
            base_url=cfg.url,
            headers={"Authorization": basic_auth(cfg.api_key, cfg.api_secret)},
            timeout=aiohttp.ClientTimeout(total=cfg.request_timeout_ms / 1000),
            connector=aiohttp.TCPConnector(ssl=ssl),
        )

    async def close(self) -> None:
        await self._session.close()

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        url = self._cfg.url
        try:
            async with self._session.request(method, path, json=body) as resp:
                answer = await read_answer(resp)
                status = resp.status
        except aiohttp.ClientError as exc:
            raise CliError(f"EMQX API unreachable at {url}: {type(exc).__name__}: {exc}") from None
        except TimeoutError:
            raise CliError(f"EMQX API at {url} did not answer within {self._cfg.request_timeout_ms} ms") from None
        if status == 401:
            raise CliError(f"EMQX API at {url} refused the API key (401{_code(answer)}): "
                           "check exhook.emqx.api_key / api_secret")
        if status == 403:
            raise CliError(f"EMQX API at {url} refused {method} {path} (403{_code(answer)}): "
                           "the API key needs the administrator role")
        return status, answer


def _code(answer: Any) -> str:
    return f" {answer['code']}" if isinstance(answer, dict) and answer.get("code") else ""


def _reason(status: int, answer: Any) -> str:
    if isinstance(answer, dict):
        text = f"{answer.get('code', '')}: {answer.get('message', '')}".strip(": ")
    else:
        text = str(answer).strip()
    text = " ".join(text.split())
    return f"{status} {text[:300]}" if text else str(status)


def _not_found(status: int, answer: Any) -> bool:
    # 404 since EMQX 5.0; earlier releases answered 400 "Server not found"
    message = answer.get("message", "") if isinstance(answer, dict) else str(answer)
    return status == 404 or (status == 400 and "not found" in str(message).lower())


async def register(cfg: Config, args: argparse.Namespace) -> int:
    want = desired_exhook(cfg, args)
    if want.request_timeout_ms != cfg.service.emqx.hook_timeout_ms:
        print(f"offline-exhook: warning: request_timeout {format_duration(want.request_timeout_ms)} is not "
              f"exhook.emqx.hook_timeout ({format_duration(cfg.service.emqx.hook_timeout_ms)}): the service takes "
              "connect calls served with under half of the latter left as signs of dropped ones; set the field "
              "to what you register",
              file=sys.stderr)
    if want.request_timeout_ms <= cfg.service.publish_deadline_ms:
        print(f"offline-exhook: warning: request_timeout {format_duration(want.request_timeout_ms)} is not above "
              f"exhook.publish_deadline ({cfg.service.publish_deadline_ms} ms): EMQX would give up on "
              "message.publish before the service answers", file=sys.stderr)
    if want.ssl.get("enable") and want.ssl.get("verify") == "verify_none":
        print("offline-exhook: warning: no --ssl-cacertfile: EMQX will not verify the service's certificate",
              file=sys.stderr)
    path = f"/api/v5/exhooks/{urllib.parse.quote(want.name, safe='')}"
    api = EmqxAdmin(cfg.service.emqx)
    try:
        status, current = await api.call("GET", path)
        if status == 200 and isinstance(current, dict):
            return await _update(api, path, want, current)
        if not _not_found(status, current):
            raise CliError(f"cannot read exhook {want.name!r} from EMQX: {_reason(status, current)}")
        status, answer = await api.call("POST", "/api/v5/exhooks", want.body())
        if status in (200, 201):
            print(f"offline-exhook: registered exhook {want.name!r} (url {want.url}) in EMQX at {cfg.service.emqx.url}")
            return 0
        if status == 400 and "already exists" in _reason(status, answer).lower():
            # registered by someone else since our GET: make it ours
            status, current = await api.call("GET", path)
            if status == 200 and isinstance(current, dict):
                return await _update(api, path, want, current)
        raise CliError(f"EMQX rejected exhook {want.name!r}: {_reason(status, answer)}")
    finally:
        await api.close()


async def _update(api: EmqxAdmin, path: str, want: Exhook, current: dict[str, Any]) -> int:
    diffs = want.differences(current)
    if not diffs:
        print(f"offline-exhook: exhook {want.name!r} is already registered with these settings: nothing to do")
        return 0
    status, answer = await api.call("PUT", path, want.body())
    if status != 200:
        raise CliError(f"EMQX rejected the update of exhook {want.name!r}: {_reason(status, answer)}")
    print(f"offline-exhook: updated exhook {want.name!r} (changed: {', '.join(diffs)})")
    return 0
