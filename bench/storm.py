"""The reconnect storm (issue 14), driven through the EMQX emulator (``tests/emulator``).

Each of N simulated MQTT clients ``storm-<i>`` has one stored subscription and one stored
message, prepared through the server as a broker would make them: the client connects,
subscribes to ``bench/storm/<i>`` (QoS 1) and disconnects (clean session, expiry 0: the
broker forgets the subscription, the service remembers it); then publishers publish one
300-byte QoS 1 message to every client's topic while nobody subscribes (the service
stores it). Then all N clients reconnect at once with a clean session and do not
subscribe themselves: the broker calls ``client.connected`` (and ``session.created`` when
the server registered it), which hold each client's CONNACK; the service restores the
subscription through the REST API (``subscribe/bulk``), the broker fires
``session.subscribed``, the service replays the stored message (``publish/bulk``), the
client receives it and acknowledges it (``message.acked``).

Measured from the emulator: time from the storm's start until every client had its
message (restored + replayed), the answer time of the CONNACK-holding hooks (per client,
the sum over the registered hooks among ``client.connect``, ``client.authenticate``,
``session.created``, ``client.connected``, ``client.connack``), the CONNACK as the client
saw it, every hook call that did not end OK (timeout after ``request_timeout``, or any
gRPC status such as CANCELLED / UNAVAILABLE), clients restored (the subscription is back
in their session), clients replayed, duplicate deliveries, and the emulator's own CPU.

The emulator runs in its own process (``run_child``), pinned to the load generators' CPU,
so that its CPU is accounted apart from the server's: a reader can tell whether the
server or the emulator was the bottleneck.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from bench.common import Latency, payload_bytes

# the hooks EMQX runs before it sends a clean-start client its CONNACK (session.resumed would be one
# too, but a clean start never resumes)
CONNACK_HOOKS = ("client.connect", "client.authenticate", "session.created", "client.connected", "client.connack")
PREPARE_PARALLEL = 200     # clients prepared at a time (the preparation is not a storm)
PUBLISHERS = 32            # clients publishing the stored messages


def clientid(i: int) -> str:
    return f"storm-{i}"


def topic(i: int) -> str:
    return f"bench/storm/{i}"


def payload(i: int, size: int) -> bytes:
    return payload_bytes(size, b"storm-%d;" % i)


@dataclass
class StormResult:
    n: int
    workers: int
    target: str
    hooks: list[str] = field(default_factory=list)     # the CONNACK-holding hooks the server registered
    prepare_s: float = 0.0
    stored_before: int | None = None
    connack_hold: Latency = field(default_factory=Latency)   # per client, sum of the CONNACK hooks
    connected: Latency = field(default_factory=Latency)      # client.connected answers alone
    # the restores' session.subscribed answers (each holds its client's process at the broker)
    subscribed: Latency = field(default_factory=Latency)
    connack_seen: Latency = field(default_factory=Latency)   # CONNACK at the client, from the storm's start
    connacks: int = 0
    failed: dict[str, int] = field(default_factory=dict)     # "hook status: error" -> count
    restored: int = 0
    replayed: int = 0
    duplicates: int = 0
    complete_s: float | None = None        # until every client was restored and replayed
    last_s: float = 0.0                    # until the last replay seen (also when incomplete)
    wall_s: float = 0.0                    # the storm until done or given up (the settle time not included)
    emulator_cpu_s: float = 0.0
    server_cpu_s: float = 0.0
    other_cores: float | None = None
    stored_after: int | None = None
    rest_calls: dict[str, int] = field(default_factory=dict)
    max_in_flight: int = 0
    error: str = ""

    @property
    def failed_calls(self) -> int:
        return sum(self.failed.values())

    @property
    def rate(self) -> float | None:
        """Clients restored and replayed per second."""
        if self.complete_s:
            return self.n / self.complete_s
        return None


# -- the emulator's side (its own process) -------------------------------------------------
class _Driver:
    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.n: int = cfg["n"]
        self.size: int = cfg["payload"]
        self.emu: Any = None
        self.clients: list[Any] = []

    async def start(self) -> dict[str, Any]:
        from tests.emulator import EmqxEmulator

        c = self.cfg
        self.emu = EmqxEmulator(c["target"], c["protocol"], api_key=c["api_key"], api_secret=c["api_secret"],
                                rest_port=c["rest_port"], pool_size=c["pool_size"],
                                request_timeout=c["request_timeout"], net_delay=c["net_delay"])
        await self.emu.start(load_timeout=30)
        self.clients = [self.emu.client(clientid(i)) for i in range(self.n)]
        return {"hooks": sorted(self.emu.hooks.hookspec)}

    async def prepare(self) -> dict[str, Any]:
        t0 = time.monotonic()
        errors: list[str] = []
        gate = asyncio.Semaphore(PREPARE_PARALLEL)

        async def one(i: int) -> None:
            client = self.clients[i]
            async with gate:
                try:
                    await client.connect(timeout=60)
                    await client.subscribe(topic(i), qos=1, timeout=60)
                    await client.disconnect(timeout=60)
                except Exception as exc:
                    errors.append(f"{clientid(i)}: {type(exc).__name__}: {exc}")

        await asyncio.gather(*(one(i) for i in range(self.n)))

        async def publisher(p: int) -> None:
            client = self.emu.client(f"storm-publisher-{p}")
            await client.connect(timeout=60)
            for i in range(p, self.n, PUBLISHERS):
                await client.publish(topic(i), payload(i, self.size), qos=1, timeout=60)
            await client.disconnect(timeout=60)

        try:
            await asyncio.gather(*(publisher(p) for p in range(PUBLISHERS)))
        except Exception as exc:
            errors.append(f"publisher: {type(exc).__name__}: {exc}")
        for client in self.clients:
            client.clear()
        self.emu.forget_history()
        return {"seconds": time.monotonic() - t0, "errors": errors[:5], "error_count": len(errors)}

    async def storm(self, timeout: float, stall: float, settle: float, replays: bool) -> dict[str, Any]:
        cpu0 = _cpu()
        t0 = time.monotonic()
        connack_at: list[float] = []
        refused: list[str] = []

        async def reconnect(client: Any) -> None:
            try:
                await client.connect(timeout=timeout)
                connack_at.append(time.monotonic() - t0)
            except Exception as exc:
                refused.append(f"{type(exc).__name__}: {exc}")

        connects = asyncio.ensure_future(asyncio.gather(*(reconnect(c) for c in self.clients)))
        deadline = t0 + timeout
        seen, since = -1, time.monotonic()
        while True:
            await asyncio.sleep(0.1)
            now = time.monotonic()
            got = sum(1 for c in self.clients if c.deliveries) if replays else 0
            if connects.done() and (not replays or got >= self.n):
                break
            if got != seen:
                seen, since = got, now
            if now >= deadline or (connects.done() and now - since >= stall):
                break
        wall = time.monotonic() - t0
        await asyncio.sleep(settle)  # late duplicates, acks still on their way
        if not connects.done():
            connects.cancel()
        return self._collect(t0, wall, _cpu() - cpu0, connack_at, refused)

    def _collect(self, t0: float, wall: float, cpu: float, connack_at: list[float],
                 refused: list[str]) -> dict[str, Any]:
        emu = self.emu
        hold: dict[str, float] = {}
        connected: list[float] = []
        subscribed: list[float] = []
        failed: dict[str, int] = {}
        for call in emu.calls:
            if call.started < t0:
                continue
            if call.status != "ok":
                key = f"{call.hook} {call.status}: {(call.error or '')[:60]}"
                failed[key] = failed.get(key, 0) + 1
            if call.hook in CONNACK_HOOKS and call.latency is not None:
                hold[call.key] = hold.get(call.key, 0.0) + call.latency
                if call.hook == "client.connected":
                    connected.append(call.latency)
            elif call.hook == "session.subscribed" and call.latency is not None:
                subscribed.append(call.latency)
        if refused:
            failed[f"connect failed: {refused[0][:60]}"] = len(refused)
        firsts = [c.deliveries[0].received_at - t0 for c in self.clients if c.deliveries]
        rest: dict[str, int] = {}
        for req in emu.rest_requests:
            if req.started < t0:
                continue  # the preparation's (its replays can still run when it returns)
            parts = req.path.strip("/").split("/")
            if parts[0] == "clients" and len(parts) > 1:
                parts[1] = "{id}"
            key = "/".join(parts)
            rest[key] = rest.get(key, 0) + 1
        return {
            "wall": wall, "cpu": cpu, "failed": failed,
            "hold": list(hold.values()), "connected": connected, "subscribed": subscribed,
            "connack_at": connack_at,
            "restored": sum(1 for i in range(self.n) if topic(i) in emu.subscriptions(clientid(i))),
            "replayed": len(firsts),
            "duplicates": sum(max(0, len(c.deliveries) - 1) for c in self.clients),
            "complete": max(firsts) if len(firsts) == self.n else None,
            "last": max(firsts, default=0.0),
            "rest": rest, "max_in_flight": emu.hooks.max_in_flight,
            "emu_errors": [f"{name}: {exc!r}"[:200] for name, exc in emu.errors[:3]],
        }

    async def serve(self, conn: Connection) -> None:
        loop = asyncio.get_running_loop()
        try:
            conn.send({"ready": True, **await self.start()})
        except Exception as exc:
            conn.send({"ready": False, "error": f"{type(exc).__name__}: {exc}"})
            return
        try:
            while True:
                cmd = await loop.run_in_executor(None, conn.recv)
                if cmd["op"] == "stop":
                    break
                try:
                    if cmd["op"] == "prepare":
                        conn.send(await self.prepare())
                    else:
                        conn.send(await self.storm(cmd["timeout"], cmd["stall"], cmd["settle"], cmd["replays"]))
                except Exception as exc:
                    conn.send({"error": f"{type(exc).__name__}: {exc}"})
        finally:
            await self.emu.stop()


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def run_child(cfg: dict[str, Any], conn: Connection) -> None:
    """Entry point of the emulator's process."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    if cfg.get("cpus"):
        os.sched_setaffinity(0, cfg["cpus"])
    driver = _Driver(cfg)
    try:
        import uvloop
    except ImportError:
        asyncio.run(driver.serve(conn))
    else:
        uvloop.run(driver.serve(conn))


# -- the benchmark's side ------------------------------------------------------------------
class EmulatorProc:
    """The emulator's process; ``await ready()``, then ``prepare()`` / ``storm()``."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=run_child, args=(cfg, child), name="bench-emulator", daemon=True)
        self.proc.start()
        child.close()

    async def _ask(self, cmd: dict[str, Any] | None, timeout: float) -> dict[str, Any]:
        if cmd is not None:
            self._conn.send(cmd)

        def recv() -> dict[str, Any]:
            if not self._conn.poll(timeout):
                raise TimeoutError("the emulator's process did not answer")
            answer: dict[str, Any] = self._conn.recv()
            return answer

        answer = await asyncio.to_thread(recv)
        if answer.get("error"):
            raise RuntimeError(f"emulator: {answer['error']}")
        return answer

    async def ready(self) -> list[str]:
        answer = await self._ask(None, 60)
        if not answer.get("ready"):
            raise RuntimeError(f"emulator did not start: {answer.get('error')}")
        return list(answer["hooks"])

    async def prepare(self, timeout: float) -> dict[str, Any]:
        return await self._ask({"op": "prepare"}, timeout)

    async def storm(self, timeout: float, stall: float, settle: float, replays: bool) -> dict[str, Any]:
        return await self._ask({"op": "storm", "timeout": timeout, "stall": stall, "settle": settle,
                                "replays": replays}, timeout + settle + 60)

    def stop(self) -> None:
        try:
            self._conn.send({"op": "stop"})
        except (OSError, ValueError):
            pass
        self.proc.join(15)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(1)
        self._conn.close()


def fill(res: StormResult, answer: dict[str, Any]) -> None:
    """The emulator's figures into ``res``."""
    res.wall_s = answer["wall"]
    res.emulator_cpu_s = answer["cpu"]
    res.failed = answer["failed"]
    res.connack_hold = Latency.of(answer["hold"])
    res.connected = Latency.of(answer["connected"])
    res.subscribed = Latency.of(answer["subscribed"])
    res.connack_seen = Latency.of(answer["connack_at"])
    res.connacks = len(answer["connack_at"])
    res.restored = answer["restored"]
    res.replayed = answer["replayed"]
    res.duplicates = answer["duplicates"]
    res.complete_s = answer["complete"]
    res.last_s = answer["last"]
    res.rest_calls = answer["rest"]
    res.max_in_flight = answer["max_in_flight"]
    if answer["emu_errors"]:
        res.error = "emulator errors: " + "; ".join(answer["emu_errors"])
