"""Real Redis topologies on loopback ports for the test suite.

Plain Python helpers (no pytest here; the fixtures live in ``tests/redis_fixtures.py``):

* ``make_tls_material(dir)``  throwaway CA, server cert (SAN IP:127.0.0.1, DNS:localhost), client cert,
  and a second unrelated CA (+ a client cert signed by it) for "wrong CA is refused" tests.
* ``RedisSingle``        one redis-server (optional TLS, ``requirepass``, ACL users via ``user`` directives
  or an aclfile).
* ``RedisSentinelSet``   1 master + 1 replica + 3 sentinels (quorum 2); ``kill_master()`` (SIGKILL by PID),
  ``wait_failover()``, ``restart_killed()``.
* ``RedisClusterSet``    6 cluster nodes (3 primaries, 3 replicas) built with ``redis-cli --cluster create``;
  ``async reshard()`` runs ``redis-cli --cluster reshard`` as an asyncio subprocess.

Every topology has ``start()`` / ``stop()`` (also a context manager) and ``config(**overrides)`` giving the
fields of our ``redis { }`` config block; ``to_hocon(cfg)`` renders such a dict as HOCON text.

Processes: every process is started with its own config file in a ``tempfile`` directory (no persistence,
``bind 127.0.0.1``), tracked by PID and stopped with SIGTERM then SIGKILL. Each server's process title
contains its config path, and every path contains ``MARKER`` (unique per Python process, or taken from
``$EXHOOK_REDIS_RUN_TOKEN``), so ``pgrep -f MARKER`` lists exactly the servers this process started.
Safety nets: an ``atexit`` hook SIGKILLs anything still registered, and children started from the main
thread run under ``setpriv --pdeathsig KILL`` (they die with the test process even if it is SIGKILLed).

Every data node also carries an internal full-rights ACL user ``ADMIN_USER`` (random password) that the
helpers use for readiness checks, FLUSHALL, replication (``masteruser``), sentinel (``auth-user``) and
``redis-cli``; the ``default`` user is left as configured (``nopass`` unless ``requirepass`` is given).
Set ``EXHOOK_REDIS_KEEP_DIRS=1`` to keep the temp dirs (configs + logs) for debugging.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.ports import bindable
from tests.ports import free_port as any_free_port

HOST = "127.0.0.1"
RUN_TOKEN = os.environ.get("EXHOOK_REDIS_RUN_TOKEN") or f"{os.getpid()}x{secrets.token_hex(4)}"
MARKER = f"exhook-redis-{RUN_TOKEN}"
ADMIN_USER = "exhook-admin"
KEEP_DIRS = os.environ.get("EXHOOK_REDIS_KEEP_DIRS", "") not in ("", "0")

TlsAuthClients = Literal["yes", "no", "optional"]


class RedisTopologyError(RuntimeError):
    """A topology could not be started, did not converge, or a helper command failed."""


class _PortInUse(RedisTopologyError):
    pass


def _binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidate = Path("/usr/bin") / name
    return str(candidate) if candidate.exists() else None


def _require_binary(name: str) -> str:
    found = _binary(name)
    if found is None:
        raise RedisTopologyError(f"{name} not found in PATH or /usr/bin")
    return found


# ---------------------------------------------------------------------------
# process tracking
# ---------------------------------------------------------------------------

_LIVE: dict[int, str] = {}  # pid -> description, for every started and not yet reaped process
_STARTED: list[int] = []  # every pid ever started by this Python process
_LIVE_LOCK = threading.Lock()


def _register(pid: int, description: str) -> None:
    with _LIVE_LOCK:
        _LIVE[pid] = description
        _STARTED.append(pid)


def _unregister(pid: int) -> None:
    with _LIVE_LOCK:
        _LIVE.pop(pid, None)


def live_pids() -> dict[int, str]:
    """Processes started by these helpers that have not been stopped (reaped) yet."""
    with _LIVE_LOCK:
        return dict(_LIVE)


def started_pids() -> list[int]:
    """Every PID these helpers ever started in this Python process."""
    with _LIVE_LOCK:
        return list(_STARTED)


def pid_running(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


@atexit.register
def _kill_leftovers() -> None:
    for pid in list(live_pids()):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
        _unregister(pid)


def _pdeathsig_prefix() -> list[str]:
    """``setpriv --pdeathsig KILL`` (util-linux): the child is SIGKILLed when the test process dies, even
    by SIGKILL. Only from the main thread: the death signal follows the *thread* that forked, and a
    worker thread (asyncio.to_thread) may exit long before the test does. No preexec_fn: it is unsafe
    with threads."""
    setpriv = _binary("setpriv")
    if setpriv is None or threading.current_thread() is not threading.main_thread():
        return []
    return [setpriv, "--pdeathsig", "KILL"]


class ManagedProcess:
    """One child process whose stdout/stderr go to ``log_path``; tracked by PID until reaped."""

    def __init__(self, argv: Sequence[str], log_path: Path, cwd: Path, description: str) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self.cwd = cwd
        self.description = description
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                [*_pdeathsig_prefix(), *self.argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                close_fds=True,
            )
        _register(self.popen.pid, self.description)

    @property
    def pid(self) -> int:
        if self.popen is None:
            raise RedisTopologyError(f"{self.description}: not started")
        return self.popen.pid

    def alive(self) -> bool:
        if self.popen is None:
            return False
        if self.popen.poll() is None:
            return True
        _unregister(self.popen.pid)  # exited and reaped
        return False

    def send_signal(self, sig: int) -> None:
        if self.alive():
            assert self.popen is not None
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(sig)

    def kill_now(self) -> None:
        """SIGKILL and reap."""
        if self.popen is None:
            return
        self.send_signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)
        if self.popen.poll() is not None:
            _unregister(self.popen.pid)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def terminate_processes(processes: Iterable[ManagedProcess], timeout: float = 5.0) -> None:
    """SIGTERM all, wait up to ``timeout`` in total, SIGKILL the rest; every process is reaped."""
    procs = [p for p in processes if p.popen is not None]
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        assert proc.popen is not None
        try:
            proc.popen.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(10)
        if proc.popen.poll() is not None:
            _unregister(proc.popen.pid)


# ---------------------------------------------------------------------------
# ports
# ---------------------------------------------------------------------------


def free_port(taken: Iterable[int] = ()) -> int:
    """A currently free loopback port, none of ``taken``."""
    avoid = set(taken)
    for _ in range(100):
        port = any_free_port()
        if port not in avoid:
            return port
    raise RedisTopologyError("no free port found")


def free_cluster_port(taken: Iterable[int] = ()) -> int:
    """A free port whose cluster bus port (port + 10000) is free as well."""
    avoid = set(taken)
    for _ in range(500):
        port = free_port()
        bus = port + 10000
        if bus > 65535 or {port, bus} & avoid:
            continue
        if bindable(bus):
            return port
    raise RedisTopologyError("no free port with a free cluster bus port found")


# ---------------------------------------------------------------------------
# TLS material
# ---------------------------------------------------------------------------

_OPENSSL_CNF = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = placeholder
[v3_ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
[v3_server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth,clientAuth
subjectAltName = IP:127.0.0.1,DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid,issuer
[v3_client]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid,issuer
"""


@dataclass(frozen=True, slots=True)
class TlsMaterial:
    """PEM files (EC P-256 keys, unencrypted). The server certificate also allows clientAuth because
    redis uses it as the client certificate for replication, cluster bus and sentinel links."""

    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca_cert: Path
    other_ca_key: Path
    other_client_cert: Path
    other_client_key: Path


def _openssl(cwd: Path, *args: str) -> None:
    result = subprocess.run(
        [_require_binary("openssl"), *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    if result.returncode != 0:
        raise RedisTopologyError(f"openssl {args[0]} failed: {result.stderr.strip()[-500:]}")


def make_tls_material(directory: str | os.PathLike[str]) -> TlsMaterial:
    """Generate the throwaway PKI with ``openssl`` into ``directory`` (created if needed)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    cnf = out / "openssl.cnf"
    cnf.write_text(_OPENSSL_CNF)
    newkey = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def ca(name: str, cn: str) -> None:
        _openssl(out, "req", "-x509", "-config", str(cnf), "-extensions", "v3_ca", *newkey,
                 "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "7", "-subj", f"/CN={cn}")

    def leaf(name: str, cn: str, ca_name: str, ext: str) -> None:
        _openssl(out, "req", "-new", "-config", str(cnf), *newkey,
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}")
        _openssl(out, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca_name}.crt", "-CAkey", f"{ca_name}.key",
                 "-set_serial", f"0x{secrets.token_hex(16)}", "-days", "7",
                 "-extfile", str(cnf), "-extensions", ext, "-out", f"{name}.crt")
        (out / f"{name}.csr").unlink()

    ca("ca", "offline-exhook test CA")
    leaf("server", "localhost", "ca", "v3_server")
    leaf("client", "offline-exhook test client", "ca", "v3_client")
    ca("other-ca", "unrelated test CA")
    leaf("other-client", "offline-exhook foreign client", "other-ca", "v3_client")
    for key in out.glob("*.key"):
        key.chmod(0o600)
    return TlsMaterial(
        directory=out,
        ca_cert=out / "ca.crt",
        ca_key=out / "ca.key",
        server_cert=out / "server.crt",
        server_key=out / "server.key",
        client_cert=out / "client.crt",
        client_key=out / "client.key",
        other_ca_cert=out / "other-ca.crt",
        other_ca_key=out / "other-ca.key",
        other_client_cert=out / "other-client.crt",
        other_client_key=out / "other-client.key",
    )


def tls_client_kwargs(
    tls: TlsMaterial,
    *,
    ca: str | os.PathLike[str] | None = None,
    client_cert: bool = True,
    check_hostname: bool = True,
) -> dict[str, Any]:
    """redis-py connection kwargs for TLS with verification (``ca`` overrides the trusted CA)."""
    kwargs: dict[str, Any] = {
        "ssl": True,
        "ssl_ca_certs": str(ca if ca is not None else tls.ca_cert),
        "ssl_cert_reqs": "required",
        "ssl_check_hostname": check_hostname,
    }
    if client_cert:
        kwargs["ssl_certfile"] = str(tls.client_cert)
        kwargs["ssl_keyfile"] = str(tls.client_key)
    return kwargs


# ---------------------------------------------------------------------------
# config helpers
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AclUser:
    """An ACL user: ``user <name> on ><password> <rules>`` (rules e.g. ``"~mqtt:* +get +set +ping"``)."""

    name: str
    password: str
    rules: str = "~* &* +@all"

    def __post_init__(self) -> None:
        for value in (self.name, self.password):
            if not value or any(c.isspace() or c in "\"'" for c in value):
                raise ValueError(f"ACL user name/password must be a non-empty word: {value!r}")

    def line(self) -> str:
        return f"user {self.name} on >{self.password} {self.rules}".rstrip()


def _q(value: str | os.PathLike[str]) -> str:
    """Quote a value for a redis config file."""
    text = str(value)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _hocon_value(value: Any, indent: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, Mapping):
        inner = indent + "  "
        body = "".join(f"{inner}{k} = {_hocon_value(v, inner)}\n" for k, v in value.items())
        return "{\n" + body + indent + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_hocon_value(v, indent) for v in value) + "]"
    return json.dumps(str(value))


def to_hocon(cfg: Mapping[str, Any], *, block: str = "redis", enable: bool = True) -> str:
    """Render a ``config()`` dict as a HOCON ``redis { enable = true ... }`` block."""
    body = {"enable": enable, **cfg} if enable else dict(cfg)
    return f"{block} {_hocon_value(body, '')}\n"


# ---------------------------------------------------------------------------
# nodes
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerOptions:
    tls: TlsMaterial | None = None
    tls_auth_clients: TlsAuthClients = "yes"
    requirepass: str | None = None
    users: tuple[AclUser, ...] = ()
    aclfile: bool = False
    extra_conf: tuple[str, ...] = ()
    admin_password: str = field(default_factory=lambda: secrets.token_hex(16), repr=False)

    def admin(self) -> AclUser:
        return AclUser(ADMIN_USER, self.admin_password, "~* &* +@all")

    def tls_conf(self, port: int, *, replication: bool = True, cluster: bool = False) -> list[str]:
        if self.tls is None:
            return [f"port {port}"]
        lines = [
            "port 0",
            f"tls-port {port}",
            f"tls-cert-file {_q(self.tls.server_cert)}",
            f"tls-key-file {_q(self.tls.server_key)}",
            f"tls-ca-cert-file {_q(self.tls.ca_cert)}",
            f"tls-auth-clients {self.tls_auth_clients}",
        ]
        if replication:
            lines.append("tls-replication yes")
        if cluster:
            lines.append("tls-cluster yes")
        return lines

    def client_kwargs(self) -> dict[str, Any]:
        """redis-py kwargs for TLS connections of the helpers (client cert always presented)."""
        return tls_client_kwargs(self.tls) if self.tls is not None else {}

    def cli_args(self) -> list[str]:
        args = ["--no-auth-warning", "--user", ADMIN_USER]
        if self.tls is not None:
            args += ["--tls", "--cacert", str(self.tls.ca_cert),
                     "--cert", str(self.tls.client_cert), "--key", str(self.tls.client_key)]
        return args

    def cli_env(self) -> dict[str, str]:
        return {**os.environ, "REDISCLI_AUTH": self.admin_password}


_COMMON_CONF = [
    "bind 127.0.0.1",
    "protected-mode no",
    "daemonize no",
    'logfile ""',
    "loglevel notice",
    'proc-title-template "{title} {listen-addr} {server-mode} {config-file}"',
]


class _Node:
    """One redis process (data node or sentinel) with its own directory and config file."""

    kind = "node"

    def __init__(self, name: str, directory: Path, opts: ServerOptions) -> None:
        self.name = name
        self.dir = directory
        self.opts = opts
        self.port = 0
        self.process: ManagedProcess | None = None
        self.conf_path = directory / f"{self.kind}.conf"
        self.log_path = directory / f"{self.kind}.log"

    @property
    def host(self) -> str:
        return HOST

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def conf_lines(self, port: int) -> list[str]:
        raise NotImplementedError

    def argv(self) -> list[str]:
        return [_require_binary("redis-server"), str(self.conf_path)]

    def client_kwargs(self) -> dict[str, Any]:
        raise NotImplementedError

    def launch(self, port: int) -> None:
        if self.process is not None and self.process.alive():
            raise RedisTopologyError(f"{self.name}: already running")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.conf_path.write_text("\n".join(self.conf_lines(port)) + "\n")
        self.process = ManagedProcess(self.argv(), self.log_path, self.dir, f"{self.name} {self.address}")
        self.process.start()

    def client(self, **kwargs: Any) -> redis.Redis:
        """A sync redis-py client with the helpers' (admin) credentials."""
        params: dict[str, Any] = {
            "host": HOST,
            "port": self.port,
            "decode_responses": True,
            "socket_timeout": 2.0,
            "socket_connect_timeout": 1.0,
            "retry": Retry(NoBackoff(), 0),  # the helpers poll themselves; redis-py's backoff only slows them
            **self.client_kwargs(),
            **kwargs,
        }
        return redis.Redis(**params)

    def alive(self) -> bool:
        return self.process is not None and self.process.alive()

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RedisTopologyError(f"{self.name}: not started")
        return self.process.pid

    def wait_ready(self, deadline: float) -> None:
        last: Exception | None = None
        while True:
            if self.process is None:
                raise RedisTopologyError(f"{self.name}: not started")
            if not self.process.alive():
                tail = self.process.log_tail()
                cls = _PortInUse if "Address already in use" in tail else RedisTopologyError
                code = self.process.popen.returncode if self.process.popen is not None else None
                raise cls(f"{self.name} ({self.address}) exited with {code}:\n{tail}")
            try:
                with self.client() as conn:
                    conn.ping()
                return
            except redis.RedisError as exc:
                last = exc
            if time.monotonic() > deadline:
                raise RedisTopologyError(f"{self.name} ({self.address}) not ready: {last}\n{self.process.log_tail()}")
            time.sleep(0.02)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the process; for SIGKILL also reap it."""
        if self.process is None:
            return
        if sig == signal.SIGKILL:
            self.process.kill_now()
        else:
            self.process.send_signal(sig)


class RedisNode(_Node):
    """A redis-server data node (standalone, replica or cluster node)."""

    kind = "redis"

    def __init__(
        self,
        name: str,
        directory: Path,
        opts: ServerOptions,
        *,
        replicaof: tuple[str, int] | None = None,
        cluster: bool = False,
        cluster_node_timeout_ms: int = 5000,
    ) -> None:
        super().__init__(name, directory, opts)
        self.replicaof = replicaof
        self.cluster = cluster
        self.cluster_node_timeout_ms = cluster_node_timeout_ms

    def conf_lines(self, port: int) -> list[str]:
        opts = self.opts
        lines = [
            *_COMMON_CONF,
            *opts.tls_conf(port, cluster=self.cluster),
            f"dir {_q(self.dir)}",
            'save ""',
            "appendonly no",
            "repl-diskless-sync-delay 0",  # default 5 s: every full sync (replica start) would wait for it
            "enable-debug-command local",
            f"masteruser {ADMIN_USER}",
            f"masterauth {opts.admin_password}",
        ]
        users = [opts.admin(), *opts.users]
        if opts.aclfile:
            acl_lines = [u.line() for u in users]
            if not any(u.name == "default" for u in users):
                password = f">{opts.requirepass}" if opts.requirepass else "nopass"
                acl_lines.insert(0, f"user default on {password} ~* &* +@all")
            aclfile = self.dir / "users.acl"
            aclfile.write_text("\n".join(acl_lines) + "\n")
            lines.append(f"aclfile {_q(aclfile)}")
        else:
            lines += [u.line() for u in users]
            if opts.requirepass:
                lines.append(f"requirepass {_q(opts.requirepass)}")
        if self.replicaof is not None:
            lines.append(f"replicaof {self.replicaof[0]} {self.replicaof[1]}")
        if self.cluster:
            lines += [
                "cluster-enabled yes",
                f"cluster-config-file {_q(self.dir / 'nodes.conf')}",
                f"cluster-node-timeout {self.cluster_node_timeout_ms}",
            ]
        lines += opts.extra_conf
        return lines

    def client_kwargs(self) -> dict[str, Any]:
        return {"username": ADMIN_USER, "password": self.opts.admin_password, **self.opts.client_kwargs()}

    def role(self) -> str:
        with self.client() as conn:
            return str(conn.execute_command("ROLE")[0])

    def info(self, section: str) -> dict[str, Any]:
        with self.client() as conn:
            return dict(conn.info(section))

    def node_id(self) -> str:
        with self.client() as conn:
            return str(conn.execute_command("CLUSTER", "MYID"))


class SentinelNode(_Node):
    """A redis-sentinel process. Sentinel rewrites its config file, so each has its own in its dir."""

    kind = "sentinel"

    def __init__(
        self,
        name: str,
        directory: Path,
        opts: ServerOptions,
        *,
        master_name: str,
        master: tuple[str, int],
        quorum: int,
        down_after_ms: int,
        failover_timeout_ms: int,
        known_replicas: Sequence[tuple[str, int]] = (),
    ) -> None:
        super().__init__(name, directory, opts)
        self.master_name = master_name
        self.master = master
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.known_replicas = list(known_replicas)
        self.myid = secrets.token_hex(20)
        self.peers: list[SentinelNode] = []

    def argv(self) -> list[str]:
        sentinel_bin = _binary("redis-sentinel")
        if sentinel_bin:
            return [sentinel_bin, str(self.conf_path)]
        return [_require_binary("redis-server"), str(self.conf_path), "--sentinel"]

    def conf_lines(self, port: int) -> list[str]:
        name = self.master_name
        lines = [
            *_COMMON_CONF,
            *self.opts.tls_conf(port),
            f"dir {_q(self.dir)}",
            f"sentinel myid {self.myid}",
            f"sentinel monitor {name} {self.master[0]} {self.master[1]} {self.quorum}",
            f"sentinel down-after-milliseconds {name} {self.down_after_ms}",
            f"sentinel failover-timeout {name} {self.failover_timeout_ms}",
            f"sentinel parallel-syncs {name} 1",
            f"sentinel auth-user {name} {ADMIN_USER}",
            f"sentinel auth-pass {name} {self.opts.admin_password}",
        ]
        # pre-seed what sentinel would otherwise discover (hello messages every 2 s, INFO every 10 s)
        lines += [f"sentinel known-replica {name} {h} {p}" for h, p in self.known_replicas]
        lines += [f"sentinel known-sentinel {name} {HOST} {peer.port} {peer.myid}" for peer in self.peers]
        return lines

    def client_kwargs(self) -> dict[str, Any]:
        return self.opts.client_kwargs()

    def sentinel(self, *args: str) -> Any:
        with self.client() as conn:
            return conn.execute_command("SENTINEL", *args)


def _pairs(value: Any) -> dict[str, str]:
    """A flat [k, v, k, v] reply (or a dict) as a dict of str."""
    if isinstance(value, Mapping):
        return {str(k): str(v) for k, v in value.items()}
    items = list(value)
    return {str(items[i]): str(items[i + 1]) for i in range(0, len(items) - 1, 2)}


def _launch_and_wait(nodes: Sequence[_Node], pick: Callable[[set[int]], int], timeout: float,
                     retries: int = 3) -> None:
    """Launch all nodes in parallel on fresh ports and wait until they answer PING; a node whose port
    was taken meanwhile is relaunched on another port."""
    deadline = time.monotonic() + timeout
    pending = list(nodes)
    for attempt in range(retries):
        taken = {n.port for n in nodes if n not in pending}
        for node in pending:
            node.launch(pick(taken))
            taken.add(node.port)
        failed: list[_Node] = []
        for node in pending:
            try:
                node.wait_ready(deadline)
            except _PortInUse:
                if attempt == retries - 1:
                    raise
                failed.append(node)
        if not failed:
            return
        pending = failed


# ---------------------------------------------------------------------------
# topologies
# ---------------------------------------------------------------------------


def _ssl_block(tls: TlsMaterial | None) -> dict[str, Any]:
    if tls is None:
        return {"enable": False, "verify": True, "cacertfile": "", "certfile": "", "keyfile": "",
                "server_name_indication": ""}
    return {"enable": True, "verify": True, "cacertfile": str(tls.ca_cert), "certfile": str(tls.client_cert),
            "keyfile": str(tls.client_key), "server_name_indication": ""}


class _Topology:
    kind = "topology"
    redis_type = "single"

    def __init__(
        self,
        *,
        tls: TlsMaterial | None = None,
        tls_auth_clients: TlsAuthClients = "yes",
        requirepass: str | None = None,
        users: Sequence[AclUser] = (),
        aclfile: bool = False,
        extra_conf: Sequence[str] = (),
        base_dir: str | os.PathLike[str] | None = None,
        start_timeout: float = 20.0,
    ) -> None:
        if any(u.name == ADMIN_USER for u in users):
            raise ValueError(f"{ADMIN_USER} is reserved for the helpers")
        self.opts = ServerOptions(
            tls=tls,
            tls_auth_clients=tls_auth_clients,
            requirepass=requirepass,
            users=tuple(users),
            aclfile=aclfile,
            extra_conf=tuple(extra_conf),
        )
        self.base_dir = base_dir
        self.start_timeout = start_timeout
        self.dir: Path | None = None
        self.started_in: float | None = None  # seconds start() took
        self._stopped = False

    # --- lifecycle -------------------------------------------------------
    def all_nodes(self) -> list[_Node]:
        raise NotImplementedError

    def _start(self) -> None:
        raise NotImplementedError

    def start(self) -> Self:
        if self.dir is not None:
            raise RedisTopologyError(f"{self.kind}: already started")
        t0 = time.monotonic()
        self.dir = Path(tempfile.mkdtemp(prefix=f"{MARKER}-{self.kind}-", dir=self.base_dir))
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        self.started_in = time.monotonic() - t0
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop every process (SIGTERM, then SIGKILL after ``timeout``) and remove the temp dir.
        Idempotent; safe after a partial start."""
        nodes = self.all_nodes()
        terminate_processes([n.process for n in nodes if n.process is not None], timeout)
        if self.dir is not None and not KEEP_DIRS:
            shutil.rmtree(self.dir, ignore_errors=True)
        self._stopped = True

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def pids(self) -> list[int]:
        """PIDs of every server process started (alive or not)."""
        return [n.pid for n in self.all_nodes() if n.process is not None and n.process.popen is not None]

    def _node_dir(self, name: str) -> Path:
        assert self.dir is not None, "not started"
        return self.dir / name

    # --- config ----------------------------------------------------------
    def servers(self) -> str:
        raise NotImplementedError

    def sentinel_name(self) -> str:
        return ""

    def config(self, *, user: str | None = None, **overrides: Any) -> dict[str, Any]:
        """Fields of our ``redis { }`` block for this topology. ``user=NAME`` selects one of the ACL
        users given at construction (username + password); ``overrides`` replace fields, a dict for
        ``ssl`` is merged into the ssl block (e.g. ``ssl={"cacertfile": tls.other_ca_cert}``)."""
        username, password = "", self.opts.requirepass or ""
        if user is not None:
            match = [u for u in self.opts.users if u.name == user]
            if not match:
                raise KeyError(f"no ACL user {user!r}")
            username, password = match[0].name, match[0].password
        base: dict[str, Any] = {
            "servers": self.servers(),
            "redis_type": self.redis_type,
            "sentinel": self.sentinel_name(),
            "username": username,
            "password": password,
            "database": 0,
            "ssl": _ssl_block(self.opts.tls),
        }
        return _merge(base, overrides)

    def client_kwargs(self, *, user: str | None = None) -> dict[str, Any]:
        """redis-py kwargs (credentials + TLS) matching ``config(user=user)``."""
        cfg = self.config(user=user)
        kwargs: dict[str, Any] = dict(self.opts.client_kwargs())
        if cfg["username"]:
            kwargs["username"] = cfg["username"]
        if cfg["password"]:
            kwargs["password"] = cfg["password"]
        return kwargs


class RedisSingle(_Topology):
    """One redis-server on a free loopback port.

    ``RedisSingle(tls=material)`` listens with TLS only (``tls-port``, ``port 0``); ``tls_auth_clients``
    yes|no|optional (default yes = client certificate required). ``requirepass`` sets the default
    user's password; ``users=[AclUser(...)]`` adds ACL users as ``user`` directives, or via an aclfile
    with ``aclfile=True``.
    """

    kind = "single"
    redis_type = "single"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.node: RedisNode | None = None

    def all_nodes(self) -> list[_Node]:
        return [self.node] if self.node is not None else []

    def _start(self) -> None:
        self.node = RedisNode("redis", self._node_dir("redis"), self.opts)
        _launch_and_wait([self.node], free_port, self.start_timeout)

    def _require(self) -> RedisNode:
        if self.node is None:
            raise RedisTopologyError("not started")
        return self.node

    @property
    def host(self) -> str:
        return HOST

    @property
    def port(self) -> int:
        return self._require().port

    @property
    def pid(self) -> int:
        return self._require().pid

    def servers(self) -> str:
        return self._require().address

    def admin_client(self, **kwargs: Any) -> redis.Redis:
        return self._require().client(**kwargs)

    def flush(self) -> None:
        with self.admin_client() as conn:
            conn.flushall()


class RedisSentinelSet(_Topology):
    """Master + replica(s) + 3 sentinels (quorum 2) monitoring ``master_name``.

    ``start()`` returns when every sentinel sees the master, the replica (link ok) and the other two
    sentinels and ``SENTINEL CKQUORUM`` is OK. ``kill_master()`` SIGKILLs the current master;
    ``await wait_failover(timeout)`` waits until all sentinels report a new, promoted master;
    ``restart_killed()`` brings killed data nodes back as replicas of the current master.
    """

    kind = "sentinel"
    redis_type = "sentinel"

    def __init__(
        self,
        master_name: str = "mymaster",
        *,
        replicas: int = 1,
        sentinels: int = 3,
        quorum: int = 2,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
        info_period_ms: int = 1000,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not master_name or any(c.isspace() for c in master_name):
            raise ValueError(f"bad master name {master_name!r}")
        self.master_name = master_name
        self.n_replicas = replicas
        self.n_sentinels = sentinels
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.info_period_ms = info_period_ms
        self.data_nodes: list[RedisNode] = []
        self.sentinels: list[SentinelNode] = []
        self._last_master: tuple[str, int] | None = None

    def all_nodes(self) -> list[_Node]:
        # sentinels first: they are stopped first and cannot start a failover during shutdown
        return [*self.sentinels, *self.data_nodes]

    def _start(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        master = RedisNode("master", self._node_dir("master"), self.opts)
        self.data_nodes = [master]
        _launch_and_wait([master], free_port, self.start_timeout)
        replicas = [RedisNode(f"replica{i}", self._node_dir(f"replica{i}"), self.opts,
                              replicaof=(HOST, master.port)) for i in range(self.n_replicas)]
        self.data_nodes += replicas
        _launch_and_wait(replicas, lambda taken: free_port(taken | {master.port}), self.start_timeout)
        for replica in replicas:
            self._wait_link_up(replica, deadline)
        self._start_sentinels(master, replicas, deadline)
        self.wait_healthy(max(1.0, deadline - time.monotonic()))

    def _start_sentinels(self, master: RedisNode, replicas: Sequence[RedisNode], deadline: float) -> None:
        # Sentinels are pre-seeded with each other's address + id, so a port clash restarts all of them.
        data_ports = {n.port for n in self.data_nodes}
        for attempt in range(3):
            self.sentinels = [
                SentinelNode(f"sentinel{i}", self._node_dir(f"sentinel{i}-{attempt}"), self.opts,
                             master_name=self.master_name, master=(HOST, master.port), quorum=self.quorum,
                             down_after_ms=self.down_after_ms, failover_timeout_ms=self.failover_timeout_ms,
                             known_replicas=[(HOST, r.port) for r in replicas])
                for i in range(self.n_sentinels)
            ]
            taken = set(data_ports)
            for sentinel in self.sentinels:
                sentinel.port = free_port(taken)
                taken.add(sentinel.port)
            for sentinel in self.sentinels:
                sentinel.peers = [s for s in self.sentinels if s is not sentinel]
            for sentinel in self.sentinels:
                sentinel.launch(sentinel.port)
            try:
                for sentinel in self.sentinels:
                    sentinel.wait_ready(deadline)
                    self._tune(sentinel)
                return
            except _PortInUse:
                terminate_processes([s.process for s in self.sentinels if s.process is not None])
                if attempt == 2:
                    raise

    def _tune(self, sentinel: SentinelNode) -> None:
        # Sentinel INFOs masters/replicas every 10 s; a restarted replica's role and link would stay
        # stale that long. Runtime-only (SENTINEL DEBUG, Redis >= 7.0), so re-applied after restarts.
        if self.info_period_ms:
            sentinel.sentinel("DEBUG", "info-period", str(self.info_period_ms))

    @staticmethod
    def _wait_link_up(replica: RedisNode, deadline: float) -> None:
        while True:
            try:
                if replica.info("replication").get("master_link_status") == "up":
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise RedisTopologyError(f"{replica.name}: replication link not up")
            time.sleep(0.02)

    # --- state -----------------------------------------------------------
    def servers(self) -> str:
        return ",".join(s.address for s in self.sentinels)

    def sentinel_name(self) -> str:
        return self.master_name

    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """For ``redis.asyncio.sentinel.Sentinel(...)``."""
        return [(HOST, s.port) for s in self.sentinels]

    def node_by_port(self, port: int) -> RedisNode:
        for node in self.data_nodes:
            if node.port == port:
                return node
        raise KeyError(port)

    def _reported_masters(self) -> list[tuple[str, int] | None]:
        out: list[tuple[str, int] | None] = []
        for sentinel in self.sentinels:
            try:
                reply = sentinel.sentinel("GET-MASTER-ADDR-BY-NAME", self.master_name)
                out.append((str(reply[0]), int(reply[1])) if reply else None)
            except redis.RedisError:
                out.append(None)
        return out

    def master_address(self) -> tuple[str, int]:
        """The master as reported by the sentinels (first answer)."""
        for addr in self._reported_masters():
            if addr is not None:
                return addr
        raise RedisTopologyError("no sentinel answered")

    def master(self) -> RedisNode:
        return self.node_by_port(self.master_address()[1])

    def replicas(self) -> list[RedisNode]:
        master = self.master()
        return [n for n in self.data_nodes if n is not master]

    def _health_problem(self) -> str | None:
        """None if every sentinel sees the master, all live replicas (link ok) and all other sentinels."""
        name = self.master_name
        try:
            masters = self._reported_masters()
            if len(set(masters)) != 1 or masters[0] is None:
                return f"sentinels disagree about the master: {masters}"
            master = self.node_by_port(masters[0][1])
            if not master.alive():
                return "master is down"
            live_replicas = {n.port for n in self.data_nodes if n is not master and n.alive()}
            for sentinel in self.sentinels:
                state = _pairs(sentinel.sentinel("MASTER", name))
                if state.get("flags") != "master":
                    return f"{sentinel.name}: master flags {state.get('flags')}"
                seen = {
                    int(r["port"]): r
                    for r in (_pairs(x) for x in sentinel.sentinel("REPLICAS", name))
                }
                for port in live_replicas:
                    rep = seen.get(port)
                    if rep is None or rep.get("flags") != "slave" or rep.get("master-link-status") != "ok" \
                            or int(rep.get("master-port", -1)) != master.port:
                        return f"{sentinel.name}: replica {port} not healthy: {rep}"
                peers = [_pairs(x) for x in sentinel.sentinel("SENTINELS", name)]
                # master_down = "voted the master down" during the last failover; stale for ~5 s, harmless
                if len(peers) != self.n_sentinels - 1 or any(
                    set(p.get("flags", "").split(",")) - {"sentinel", "master_down"} for p in peers
                ):
                    return f"{sentinel.name}: sentinels {[p.get('flags') for p in peers]}"
                sentinel.sentinel("CKQUORUM", name)
        except (redis.RedisError, KeyError, IndexError, ValueError) as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    def wait_healthy(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            problem = self._health_problem()
            if problem is None:
                return
            if time.monotonic() > deadline:
                raise RedisTopologyError(f"sentinel set not healthy after {timeout:.1f}s: {problem}")
            time.sleep(0.05)

    # --- failover --------------------------------------------------------
    def kill_master(self) -> tuple[str, int]:
        """SIGKILL the current master (by PID); returns its address."""
        addr = self.master_address()
        node = self.node_by_port(addr[1])
        node.kill(signal.SIGKILL)
        self._last_master = addr
        return addr

    def _failover_done(self, old: tuple[str, int]) -> tuple[str, int] | None:
        masters = self._reported_masters()
        first = masters[0]
        if first is None or first == old or any(m != first for m in masters):
            return None
        try:
            node = self.node_by_port(first[1])
            return first if node.alive() and node.role() == "master" else None
        except (KeyError, redis.RedisError):
            return None

    def wait_failover_sync(self, timeout: float = 30.0, old: tuple[str, int] | None = None) -> tuple[str, int]:
        """Block until all sentinels report a master other than ``old`` (default: the one killed last)
        and that node says it is a master. Returns the new master's address."""
        previous = old or self._last_master or self.master_address()
        deadline = time.monotonic() + timeout
        while True:
            new = self._failover_done(previous)
            if new is not None:
                self._last_master = None
                return new
            if time.monotonic() > deadline:
                raise RedisTopologyError(f"no failover away from {previous} within {timeout}s: "
                                         f"{self._reported_masters()}")
            time.sleep(0.05)

    async def wait_failover(self, timeout: float = 30.0, old: tuple[str, int] | None = None) -> tuple[str, int]:
        """Async version of ``wait_failover_sync`` (the event loop keeps running meanwhile)."""
        previous = old or self._last_master
        if previous is None:
            previous = await asyncio.to_thread(self.master_address)
        deadline = time.monotonic() + timeout
        while True:
            new = await asyncio.to_thread(self._failover_done, previous)
            if new is not None:
                self._last_master = None
                return new
            if time.monotonic() > deadline:
                raise RedisTopologyError(f"no failover away from {previous} within {timeout}s")
            await asyncio.sleep(0.05)

    def has_dead_nodes(self) -> bool:
        return any(not n.alive() for n in self.all_nodes())

    def restart_killed(self, timeout: float = 20.0) -> None:
        """Restart dead data nodes (same port, as replicas of the current master) and dead sentinels
        (same port and config), then wait until the set is healthy again."""
        deadline = time.monotonic() + timeout
        for sentinel in self.sentinels:
            if not sentinel.alive():
                if sentinel.process is not None:
                    sentinel.process.kill_now()
                sentinel.process = ManagedProcess(sentinel.argv(), sentinel.log_path, sentinel.dir,
                                                  f"{sentinel.name} {sentinel.address}")
                sentinel.process.start()  # keep its (rewritten) config file
                sentinel.wait_ready(deadline)
                self._tune(sentinel)
        if not self.master().alive():  # master killed, failover not finished yet
            self.wait_failover_sync(max(1.0, deadline - time.monotonic()), old=self.master_address())
        master = self.master()
        for node in self.data_nodes:
            if node is not master and not node.alive():
                if node.process is not None:
                    node.process.kill_now()
                node.replicaof = (HOST, master.port)
                node.launch(node.port)
                node.wait_ready(deadline)
                self._wait_link_up(node, deadline)
        self.wait_healthy(max(1.0, deadline - time.monotonic()))

    def flush(self) -> None:
        with self.master().client() as conn:
            conn.flushall()
            conn.execute_command("WAIT", len(self.data_nodes) - 1, 2000)


@dataclass(frozen=True, slots=True)
class ClusterNodeInfo:
    """One line of ``CLUSTER NODES``."""

    node_id: str
    host: str
    port: int
    role: Literal["primary", "replica"]
    primary_id: str | None
    slots: tuple[str, ...]
    flags: tuple[str, ...]
    myself: bool = False

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def slot_count(self) -> int:
        total = 0
        for item in self.slots:
            if item.startswith("["):
                continue
            lo, _, hi = item.partition("-")
            total += int(hi or lo) - int(lo) + 1
        return total


def parse_cluster_nodes(text: str) -> list[ClusterNodeInfo]:
    out = []
    for line in text.strip().splitlines():
        parts = line.split()
        addr = parts[1].split("@")[0]
        host, _, port = addr.rpartition(":")
        raw_flags = parts[2].split(",")
        flags = tuple(f for f in raw_flags if f != "myself")
        out.append(ClusterNodeInfo(
            node_id=parts[0],
            host=host,
            port=int(port),
            role="primary" if "master" in flags else "replica",
            primary_id=None if parts[3] == "-" else parts[3],
            slots=tuple(parts[8:]),
            flags=flags,
            myself="myself" in raw_flags,
        ))
    return sorted(out, key=lambda n: n.port)


class RedisClusterSet(_Topology):
    """``primaries`` x (1 + ``replicas_per_primary``) cluster nodes created with
    ``redis-cli --cluster create ... --cluster-replicas N --cluster-yes``; ``start()`` returns when every
    node reports ``cluster_state:ok``, all nodes agree on the slot map and every replica's link is up.
    TLS uses ``tls-cluster yes`` + ``tls-replication yes`` (the bus port is tls-port + 10000)."""

    kind = "cluster"
    redis_type = "cluster"

    def __init__(self, *, primaries: int = 3, replicas_per_primary: int = 1,
                 node_timeout_ms: int = 5000, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if primaries < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 primaries")
        self.n_primaries = primaries
        self.replicas_per_primary = replicas_per_primary
        self.node_timeout_ms = node_timeout_ms
        self.nodes: list[RedisNode] = []

    def all_nodes(self) -> list[_Node]:
        return list(self.nodes)

    def _start(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        count = self.n_primaries * (1 + self.replicas_per_primary)
        self.nodes = [RedisNode(f"node{i}", self._node_dir(f"node{i}"), self.opts, cluster=True,
                                cluster_node_timeout_ms=self.node_timeout_ms) for i in range(count)]

        def pick(taken: set[int]) -> int:
            return free_cluster_port(taken | {p + 10000 for p in taken})

        _launch_and_wait(self.nodes, pick, self.start_timeout)
        argv = [_require_binary("redis-cli"), *self.opts.cli_args(), "--cluster", "create",
                *(n.address for n in self.nodes), "--cluster-replicas", str(self.replicas_per_primary),
                "--cluster-yes"]
        result = subprocess.run(argv, env=self.opts.cli_env(), stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, check=False,
                                timeout=max(1.0, deadline - time.monotonic()))
        if result.returncode != 0 or "[ERR]" in result.stdout:
            raise RedisTopologyError(f"redis-cli --cluster create failed ({result.returncode}):\n"
                                     f"{result.stdout[-2000:]}{result.stderr[-1000:]}")
        self.wait_stable(max(1.0, deadline - time.monotonic()), roles=True)

    # --- state -----------------------------------------------------------
    def servers(self) -> str:
        return ",".join(n.address for n in self.nodes)

    def startup_nodes(self) -> list[tuple[str, int]]:
        return [(HOST, n.port) for n in self.nodes]

    def _live_node(self) -> RedisNode:
        for node in self.nodes:
            if node.alive():
                return node
        raise RedisTopologyError("no live cluster node")

    def node_by_port(self, port: int) -> RedisNode:
        for node in self.nodes:
            if node.port == port:
                return node
        raise KeyError(port)

    def nodes_info(self, via: RedisNode | None = None) -> list[ClusterNodeInfo]:
        """``CLUSTER NODES`` as seen by ``via``; by default every live node's own (``myself``) entry,
        which is authoritative for its role and slots while gossip is still spreading."""
        if via is not None:
            with via.client() as conn:
                return parse_cluster_nodes(str(conn.execute_command("CLUSTER", "NODES")))
        out = []
        for node in self.nodes:
            if node.alive():
                out += [n for n in self.nodes_info(node) if n.myself]
        return sorted(out, key=lambda n: n.port)

    def primaries(self) -> list[ClusterNodeInfo]:
        return [n for n in self.nodes_info() if n.role == "primary" and "fail" not in n.flags]

    def replicas(self) -> list[ClusterNodeInfo]:
        return [n for n in self.nodes_info() if n.role == "replica"]

    def _stability_problem(self, roles: bool) -> str | None:
        slot_views: list[list[Any]] = []
        role_views: list[list[Any]] = []
        flagged: set[str] = set()
        try:
            for node in self.nodes:
                if not node.alive():
                    continue
                with node.client() as conn:
                    info = dict(line.split(":", 1) for line in
                                str(conn.execute_command("CLUSTER", "INFO")).split() if ":" in line)
                    if info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != "16384" \
                            or info.get("cluster_known_nodes") != str(len(self.nodes)):
                        return f"{node.name}: {info}"
                    nodes = parse_cluster_nodes(str(conn.execute_command("CLUSTER", "NODES")))
                    # the slot map (what clients and redis-cli --cluster check care about); which node
                    # replicates which spreads by gossip more slowly and is not compared
                    slot_views.append(sorted((n.node_id, n.slots, n.flags) for n in nodes if n.slots))
                    role_views.append(sorted((n.node_id, n.role, n.primary_id) for n in nodes))
                    flagged.update(f for n in nodes for f in n.flags)
                    if conn.execute_command("ROLE")[0] == "slave" \
                            and conn.info("replication").get("master_link_status") != "up":
                        return f"{node.name}: replication link down"
        except redis.RedisError as exc:
            return f"{type(exc).__name__}: {exc}"
        if any(view != slot_views[0] for view in slot_views):
            return "nodes disagree about the slot map"
        if roles and any(view != role_views[0] for view in role_views):
            return "nodes disagree about which node replicates which"
        bad = {f for f in flagged if f in ("fail", "fail?", "handshake", "noaddr")}
        if bad:
            return f"some node is flagged {sorted(bad)}"
        return None

    def wait_stable(self, timeout: float = 20.0, *, roles: bool = False) -> None:
        """Wait for cluster_state:ok on every live node, one slot map everywhere (with ``roles``: also
        the same primary/replica relations everywhere) and every replica's link up."""
        deadline = time.monotonic() + timeout
        while True:
            problem = self._stability_problem(roles)
            if problem is None:
                return
            if time.monotonic() > deadline:
                raise RedisTopologyError(f"cluster not stable after {timeout:.1f}s: {problem}")
            time.sleep(0.05)

    def flush(self) -> None:
        """FLUSHALL on every primary (and wait for the replicas)."""
        for info in self.primaries():
            with self.node_by_port(info.port).client() as conn:
                conn.flushall()
                conn.execute_command("WAIT", self.replicas_per_primary, 2000)

    # --- resharding ------------------------------------------------------
    def _id_of(self, node: ClusterNodeInfo | RedisNode | str) -> str:
        if isinstance(node, ClusterNodeInfo):
            return node.node_id
        if isinstance(node, RedisNode):
            return node.node_id()
        return node

    async def reshard(
        self,
        slots: int,
        from_node: ClusterNodeInfo | RedisNode | str,
        to_node: ClusterNodeInfo | RedisNode | str,
        *,
        pipeline: int = 10,
        timeout: float = 120.0,
        wait_stable: bool = True,
    ) -> str:
        """Move ``slots`` slots with ``redis-cli --cluster reshard`` (non-interactive) in an asyncio
        subprocess, so the caller's event loop can apply load meanwhile. ``from_node`` may be a node,
        a node id, a comma-separated list of ids or ``"all"``. Returns redis-cli's output; raises
        ``RedisTopologyError`` on failure (the subprocess is killed on timeout/cancellation)."""
        from_id = await asyncio.to_thread(self._id_of, from_node)
        to_id = await asyncio.to_thread(self._id_of, to_node)
        entry = self._live_node().address
        argv = [_require_binary("redis-cli"), *self.opts.cli_args(), "--cluster", "reshard", entry,
                "--cluster-from", from_id, "--cluster-to", to_id, "--cluster-slots", str(slots),
                "--cluster-yes", "--cluster-pipeline", str(pipeline)]
        proc = await asyncio.create_subprocess_exec(
            *_pdeathsig_prefix(), *argv, env=self.opts.cli_env(), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        _register(proc.pid, f"redis-cli reshard {entry}")
        try:
            out_bytes, _ = await asyncio.wait_for(proc.communicate(), timeout)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await asyncio.shield(proc.wait())
            raise
        finally:
            if proc.returncode is not None:
                _unregister(proc.pid)
        output = out_bytes.decode(errors="replace")
        if proc.returncode != 0 or "[ERR]" in output:
            raise RedisTopologyError(f"redis-cli --cluster reshard failed ({proc.returncode}):\n{output[-3000:]}")
        if wait_stable:
            await asyncio.to_thread(self.wait_stable, 30.0)
        return output

