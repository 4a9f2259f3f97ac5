"""The broker's side of ExHook: a pool of gRPC channels, the loaded HookSpecs, the call log.

Mirrors ``emqx_exhook_server`` / ``emqx_exhook`` (EMQX 5.x):

* ``OnProviderLoaded`` answers a list of ``HookSpec``; an unknown hook name makes loading fail.
* a hook is called only when it was named; a ``message.*`` hook only for messages whose topic matches one of
  the spec's ``topics`` (``[]`` = every topic); ``$SYS/`` messages never reach the server.
* every request carries ``meta`` (``RequestMeta``); the pool channel is chosen by a key: the clientid of
  ``clientinfo``/``conninfo``, else the message's ``from`` (EMQX hashes with ``erlang:phash2``; crc32 here).
* each call has the ``request_timeout`` deadline; on timeout or error the call is abandoned and EMQX's
  ``failed_action`` decides for the folded hooks (``client.authenticate``, ``client.authorize``,
  ``message.publish``): ``deny`` stops the chain with a deny result (for ``message.publish``: the message is
  published unchanged), ``ignore`` goes on as if the server had answered IGNORE.
* TLS (``exhook.servers[].ssl``, :class:`ExHookSsl`): EMQX speaks TLS to a server whose ``url`` is
  ``https://...`` and takes the options from the ``ssl`` block (``emqx_exhook_server:channel_opts``; an
  ``http://`` url is plaintext whatever ``ssl`` says). The block is ``emqx_schema:client_ssl_opts_schema``:
  ``enable`` (default false), ``cacertfile``, ``certfile``/``keyfile`` (the client certificate a mutual-TLS
  server asks for), ``verify`` (``verify_none``, the default, or ``verify_peer``: the server's chain must lead
  to ``cacertfile`` and its certificate must name the host) and ``server_name_indication`` (the name sent in
  SNI and checked against the certificate; unset = the url's host; ``disable`` = no SNI, no name check).
  That is EMQX since emqx/emqx PR 15683; older 5.x releases handed only the three files to the TLS client.
"""

from __future__ import annotations

import asyncio
import importlib
import ssl
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc

from .topics import match

MESSAGE_HOOKS = ("message.publish", "message.delivered", "message.acked", "message.dropped")
AVAILABLE_HOOKS = (
    "client.connect",
    "client.connack",
    "client.connected",
    "client.disconnected",
    "client.authenticate",
    "client.authorize",
    "client.subscribe",
    "client.unsubscribe",
    "session.created",
    "session.subscribed",
    "session.unsubscribed",
    "session.resumed",
    "session.discarded",
    "session.takenover",
    "session.terminated",
    *MESSAGE_HOOKS,
)
RPC_OF_HOOK = {h: "On" + "".join(p.capitalize() for p in h.split(".")) for h in AVAILABLE_HOOKS}
FOLDED_HOOKS = ("client.authenticate", "client.authorize", "message.publish")


class HookLoadError(RuntimeError):
    """OnProviderLoaded failed or answered an unknown hook name."""


@dataclass(frozen=True)
class ExHookSsl:
    """EMQX's ``exhook.servers[].ssl`` block (see the module docstring). ``enable = True`` stands for EMQX's
    ``url = "https://..."`` with ``ssl.enable = true``; ``server_name_indication = ""`` means unset."""

    enable: bool = False
    cacertfile: str = ""
    certfile: str = ""
    keyfile: str = ""
    verify: str = "verify_none"
    server_name_indication: str = ""

    def __post_init__(self) -> None:
        if self.verify not in ("verify_peer", "verify_none"):
            raise ValueError(f"ssl.verify must be verify_peer or verify_none, not {self.verify!r}")
        if bool(self.certfile) != bool(self.keyfile):
            raise ValueError("ssl.certfile and ssl.keyfile go together")

    @classmethod
    def of(cls, value: ExHookSsl | Mapping[str, Any] | None) -> ExHookSsl:
        """Also takes the block as a mapping, e.g. ``{"enable": True, "verify": "verify_peer", ...}``."""
        if value is None:
            return cls()
        if isinstance(value, ExHookSsl):
            return value
        known = {f.name for f in fields(cls)}
        unknown = set(value) - known
        if unknown:
            raise ValueError(f"unknown ssl option(s): {', '.join(sorted(unknown))}")
        values: dict[str, Any] = {k: (bool(v) if k == "enable" else str(v)) for k, v in value.items()}
        return cls(**values)

    @property
    def trusts_any_server(self) -> bool:
        return self.verify == "verify_none"

    @property
    def checks_name(self) -> bool:
        return self.verify == "verify_peer" and self.server_name_indication != "disable"


def _read(path: str) -> bytes | None:
    """A small PEM file's bytes, None for no file (read once when the pool opens)."""
    return Path(path).read_bytes() if path else None


def _split_target(target: str) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    return host.strip("[]"), int(port)


def _name_in(cert: dict[str, Any]) -> str:
    """A name the certificate is valid for: its first DNS name, else IP address, else common name."""
    alt = cert.get("subjectAltName", ())
    for kind in ("DNS", "IP Address"):
        for k, v in alt:
            if k == kind:
                return str(v)
    for rdn in cert.get("subject", ()):
        for k, v in rdn:
            if k == "commonName":
                return str(v)
    return ""


async def fetch_server_certificate(target: str, opts: ExHookSsl, timeout: float) -> tuple[bytes, str]:
    """The certificate the TLS server at ``target`` presents (PEM) and a name it is valid for.

    gRPC's TLS always checks the chain and the name, while EMQX skips both with ``verify = verify_none``
    (and the name with ``server_name_indication = disable``): the emulator then trusts exactly the
    certificate the server presents when the pool opens, under a name taken from it.
    """
    host, port = _split_target(target)
    sni = opts.server_name_indication if opts.server_name_indication not in ("", "disable") else None

    def context(trusted: bytes | None) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.set_alpn_protocols(["h2"])
        if opts.certfile:  # a mutual-TLS server ends the handshake of a client without certificate
            ctx.load_cert_chain(opts.certfile, opts.keyfile)
        if trusted is None:
            ctx.verify_mode = ssl.CERT_NONE
        else:  # trusting exactly the certificate makes ssl decode it for us
            ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
            ctx.load_verify_locations(cadata=trusted)
        return ctx

    async def handshake(ctx: ssl.SSLContext) -> tuple[bytes | None, dict[str, Any] | None]:
        """The certificate as DER, and decoded (only when ``ctx`` verified it)."""
        _, writer = await asyncio.open_connection(host, port, ssl=ctx, server_hostname=sni or host)
        try:
            obj: ssl.SSLObject = writer.get_extra_info("ssl_object")
            return obj.getpeercert(binary_form=True), obj.getpeercert()  # type: ignore[return-value]
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except (OSError, ssl.SSLError):
                pass

    deadline = time.monotonic() + timeout
    while True:
        try:
            der, _ = await handshake(context(None))
            assert der is not None
            _, decoded = await handshake(context(der))
            assert decoded is not None
            return ssl.DER_cert_to_PEM_cert(der).encode(), _name_in(decoded)
        except (OSError, ssl.SSLError) as exc:  # not listening yet: EMQX retries too (auto_reconnect)
            if time.monotonic() >= deadline:
                raise HookLoadError(f"cannot fetch the server certificate of {target}: {exc}") from exc
            await asyncio.sleep(0.05)


@dataclass
class HookCall:
    """One gRPC call the broker made (or abandoned)."""

    hook: str
    rpc: str
    key: str
    channel: int
    request: Any
    started: float
    finished: float | None = None
    status: str = "pending"  # "ok" | "timeout" | "error"
    response: Any = None
    error: str | None = None
    answer: str | None = None  # message.publish: how the answer was applied (see broker)

    @property
    def latency(self) -> float | None:
        return None if self.finished is None else self.finished - self.started


@dataclass
class _Failure:
    hook: str
    key: str | None
    left: int
    code: str


@dataclass
class HookStats:
    calls: int = 0
    ok: int = 0
    timeouts: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)


def pb_modules(version: str) -> tuple[ModuleType, ModuleType]:
    if version not in ("v2", "v3"):
        raise ValueError(f"version must be 'v2' or 'v3', not {version!r}")
    pb = importlib.import_module(f"exhook.pb.{version}.exhook_pb2")
    pb_grpc = importlib.import_module(f"exhook.pb.{version}.exhook_pb2_grpc")
    return pb, pb_grpc


class ExHookClient:
    def __init__(
        self,
        target: str,
        version: str,
        *,
        pool_size: int,
        request_timeout: float,
        failed_action: str,
        node: str,
        emqx_version: str,
        cluster_name: str,
        ssl: ExHookSsl | Mapping[str, Any] | None = None,
    ) -> None:
        if failed_action not in ("deny", "ignore"):
            raise ValueError("failed_action must be 'deny' or 'ignore'")
        if pool_size < 1:
            raise ValueError("pool_size must be >= 1")
        self.target = target
        self.ssl = ExHookSsl.of(ssl)
        self.version = version
        self.pb, self._pb_grpc = pb_modules(version)
        self.pool_size = pool_size
        self.request_timeout = request_timeout
        self.failed_action = failed_action
        self.node = node
        self.emqx_version = emqx_version
        self.cluster_name = cluster_name
        self.started_at = time.time()
        self.hookspec: dict[str, list[str]] = {}
        self.loaded = False
        self.calls: list[HookCall] = []
        self.stats: dict[str, HookStats] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self._failures: list[_Failure] = []
        self._late_answers: dict[tuple[str, str], float] = {}
        self._channels: list[grpc.aio.Channel] = []
        self._stubs: list[Any] = []

    # ------------------------------------------------------------------ lifecycle
    def meta(self) -> Any:
        return self.pb.RequestMeta(
            node=self.node, version=self.emqx_version, sysdescr="EMQX", cluster_name=self.cluster_name
        )

    async def _credentials(self, timeout: float) -> tuple[grpc.ChannelCredentials, list[tuple[str, Any]]]:
        """TLS credentials and channel options for ``self.ssl`` (see :func:`fetch_server_certificate`)."""
        opts = self.ssl
        key, chain, roots = _read(opts.keyfile), _read(opts.certfile), _read(opts.cacertfile)
        name = opts.server_name_indication if opts.checks_name else ""
        if not opts.checks_name:
            presented, name = await fetch_server_certificate(self.target, opts, timeout)
            if opts.trusts_any_server:
                roots = presented
        options: list[tuple[str, Any]] = [("grpc.ssl_target_name_override", name)] if name else []
        return grpc.ssl_channel_credentials(roots, key, chain), options

    async def _open_channels(self, timeout: float) -> None:
        tls = await self._credentials(timeout) if self.ssl.enable else None
        for i in range(self.pool_size):
            # a local subchannel pool gives each pool member its own HTTP/2 connection, as EMQX's pool has
            options: list[tuple[str, Any]] = [("grpc.use_local_subchannel_pool", 1), ("grpc.emqx_emulator_channel", i)]
            if tls is None:
                ch = grpc.aio.insecure_channel(self.target, options=options)
            else:
                ch = grpc.aio.secure_channel(self.target, tls[0], options=options + tls[1])
            self._channels.append(ch)
            self._stubs.append(self._pb_grpc.HookProviderStub(ch))

    async def load(self, timeout: float) -> dict[str, list[str]]:
        """Open the pool and call OnProviderLoaded (waiting up to ``timeout`` for the server to come up)."""
        if not self._channels:
            await self._open_channels(timeout)
        pb = self.pb
        now = time.time()
        broker = pb.BrokerInfo(
            version=self.emqx_version,
            sysdescr="EMQX",
            uptime=int((now - self.started_at) * 1000),
            datetime=time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)),
        )
        req = pb.ProviderLoadedRequest(broker=broker, meta=self.meta())
        call = self._record("provider.loaded", "OnProviderLoaded", "", 0, req)
        try:
            resp = await self._stubs[0].OnProviderLoaded(req, timeout=timeout, wait_for_ready=True)
        except grpc.aio.AioRpcError as exc:
            self._finish(call, "error", error=f"{exc.code().name}: {exc.details()}")
            raise HookLoadError(f"OnProviderLoaded failed: {exc.code().name} {exc.details()}") from exc
        self._finish(call, "ok", response=resp)
        spec: dict[str, list[str]] = {}
        for hs in resp.hooks:
            if not hs.name:
                continue
            if hs.name not in AVAILABLE_HOOKS:
                raise HookLoadError(f"unknown_hookpoint {hs.name!r}")
            spec[hs.name] = list(hs.topics) if hs.name in MESSAGE_HOOKS else []
        self.hookspec = spec
        self.loaded = True
        return spec

    async def unload(self) -> None:
        if self.loaded and self._stubs:
            req = self.pb.ProviderUnloadedRequest(meta=self.meta())
            call = self._record("provider.unloaded", "OnProviderUnloaded", "", 0, req)
            try:
                resp = await self._stubs[0].OnProviderUnloaded(req, timeout=min(1.0, self.request_timeout))
                self._finish(call, "ok", response=resp)
            except grpc.aio.AioRpcError as exc:
                self._finish(call, "error", error=exc.code().name)
        self.loaded = False

    async def close(self) -> None:
        for ch in self._channels:
            await ch.close(None)
        self._channels.clear()
        self._stubs.clear()

    # ------------------------------------------------------------------ calls
    def registered(self, hook: str) -> bool:
        return self.loaded and hook in self.hookspec

    def wants(self, hook: str, topic: str | None = None) -> bool:
        """Would EMQX call ``hook`` (for a message on ``topic``)?"""
        if not self.registered(hook):
            return False
        if hook in MESSAGE_HOOKS:
            assert topic is not None
            if topic.startswith("$SYS/"):
                return False
            topics = self.hookspec[hook]
            return not topics or any(match(topic, f) for f in topics)
        return True

    def fail(self, hook: str, key: str | None = None, times: int = 1, code: str = "CANCELLED") -> None:
        """Test-only: the next ``times`` calls of ``hook`` (for ``key``, the clientid or the message's
        ``from``; any key when None) end with status ``code`` without reaching the server, as the calls
        the gRPC C-core rejects under a burst do (EMQX then logs ``exhook_call_error`` and carries on)."""
        self._failures.append(_Failure(hook, key, times, code))

    def answer_late(self, hook: str, key: str, seconds: float) -> None:
        """Test-only: the answers to ``hook`` for ``key`` reach the client's process ``seconds``
        after the server gave them (a loaded broker whose schedulers run that process late):
        the process stays in the hook meanwhile, so a REST subscribe waits behind it."""
        self._late_answers[(hook, key)] = seconds

    def _injected_failure(self, hook: str, key: str) -> str | None:
        for failure in self._failures:
            if failure.hook == hook and failure.key in (None, key) and failure.left > 0:
                failure.left -= 1
                return failure.code
        return None

    def channel_index(self, key: str) -> int:
        return zlib.crc32(key.encode()) % self.pool_size

    def _record(self, hook: str, rpc: str, key: str, channel: int, request: Any) -> HookCall:
        call = HookCall(hook=hook, rpc=rpc, key=key, channel=channel, request=request, started=time.monotonic())
        self.calls.append(call)
        self.stats.setdefault(hook, HookStats()).calls += 1
        return call

    def _finish(self, call: HookCall, status: str, *, response: Any = None, error: str | None = None) -> None:
        call.finished = time.monotonic()
        call.status = status
        call.response = response
        call.error = error
        st = self.stats.setdefault(call.hook, HookStats())
        if status == "ok":
            st.ok += 1
        elif status == "timeout":
            st.timeouts += 1
        else:
            st.errors += 1
        assert call.latency is not None
        st.latencies.append(call.latency)

    async def call(self, hook: str, request: Any, key: str) -> tuple[Any | None, HookCall]:
        """Make one blocking unary call (the caller awaits it inside its own process).

        Returns ``(response, call)``; ``response`` is None on timeout or error.
        """
        request.meta.CopyFrom(self.meta())
        idx = self.channel_index(key)
        rpc = RPC_OF_HOOK[hook]
        call = self._record(hook, rpc, key, idx, request)
        injected = self._injected_failure(hook, key)
        if injected is not None:
            self._finish(call, "error", error=f"{injected}: {injected} (injected)")
            return None, call
        method = getattr(self._stubs[idx], rpc)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            resp = await method(request, timeout=self.request_timeout)
        except grpc.aio.AioRpcError as exc:
            status = "timeout" if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED else "error"
            self._finish(call, status, error=f"{exc.code().name}: {exc.details()}")
            return None, call
        except asyncio.CancelledError:
            self._finish(call, "error", error="cancelled")
            raise
        finally:
            self.in_flight -= 1
        self._finish(call, "ok", response=resp)
        late = self._late_answers.get((hook, key))
        if late:
            await asyncio.sleep(late)
        return resp, call
