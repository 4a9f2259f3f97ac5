"""A hypothesis-driven fuzz of every hook (issue 10, "How it is tested"): random but
well-formed and malformed requests for every RPC of ``emqx.exhook.v2`` and ``v3``,
and random bytes through a raw call, against a running service on SQLite (with the
emulated broker's REST API behind it, so subscriptions really replay). Every call is
answered (OK, INVALID_ARGUMENT or PERMISSION_DENIED; never UNKNOWN or INTERNAL, never
a timeout), nothing is logged with a traceback, and afterwards the service stores a
probe publish at once. Bounded: a time budget and a cap on examples."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.e2e.backends import SqliteBackend
from tests.e2e.harness import Harness
from tests.e2e.plain_reads import sqlite_rows
from tests.hook_calls import PB, is_ignore, message, new_id, publish_request, stub

BUDGET_S = 8.0  # per fuzz run (two runs: typed requests, raw bytes)
ANSWERED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED}
FUZZ = settings(deadline=None, max_examples=1500, database=None, derandomize=False,
                suppress_health_check=list(HealthCheck))

_GUID = st.from_regex(r"[0-9A-F]{32}", fullmatch=True)
_TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=40)
_TOPIC = st.one_of(
    st.sampled_from(["t/a", "t/b/c", "t/#", "t/+/x", "$share/g/t/#", "$share/g", "#", "+", "", "/", "t//",
                     "$SYS/brokers", "t/\x00", "t/\U0001F600", "t/'; DROP TABLE mqtt_msg; --", "w/long"]),
    _TEXT.map(lambda s: "t/" + s),
    st.integers(1, 70_000).map(lambda n: "t/" + "x" * n),
)
_STRINGS = {  # realistic values for fields of these names, else anything
    "id": st.one_of(_GUID, _TEXT, st.just("A" * 100)),
    "topic": _TOPIC,
    "clientid": st.one_of(st.sampled_from(["c1", "c2", "L" * 100, "", "c\x00", "c\U0001F600"]), _TEXT),
    "node": st.just("emqx@127.0.0.1"),
    "from": st.one_of(st.sampled_from(["c1", "http_api", "", "a\x00b"]), _TEXT),
}
_INTS = {
    FieldDescriptor.TYPE_UINT32: st.one_of(st.sampled_from([0, 1, 2, 3, 255]), st.integers(0, 2**32 - 1)),
    FieldDescriptor.TYPE_UINT64: st.one_of(st.just(int(time.time() * 1000)), st.sampled_from([0, 2**64 - 1]),
                                           st.integers(0, 2**64 - 1)),
    FieldDescriptor.TYPE_INT32: st.integers(-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: st.integers(-(2**63), 2**63 - 1),
}


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    if field.type == FieldDescriptor.TYPE_STRING:
        return _STRINGS.get(field.name, _TEXT)
    if field.type == FieldDescriptor.TYPE_BYTES:
        return st.one_of(st.binary(max_size=300), st.integers(0, 3_000_000).map(lambda n: b"p" * n))
    if field.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if field.type == FieldDescriptor.TYPE_ENUM:
        assert field.enum_type is not None
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(-(2**31), 2**31 - 1))
    return _INTS.get(field.type, st.integers(0, 2**31 - 1))


def _value(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        return st.dictionaries(_TEXT, _TEXT, max_size=3)
    one = fields_of(field.message_type, depth + 1) if field.message_type is not None else _scalar(field)
    if field.is_repeated:
        return st.lists(one, max_size=3)
    return one


def fields_of(desc: Descriptor, depth: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    """Keyword arguments for ``desc``'s constructor, any subset of its fields set."""
    if depth > 3:
        return st.just({})
    return st.fixed_dictionaries({}, optional={f.name: _value(f, depth) for f in desc.fields})


def methods(pb: ModuleType) -> list[Any]:
    return list(pb.DESCRIPTOR.services_by_name["HookProvider"].methods)


RPCS = [(version, method) for version, pb in PB.items() for method in methods(pb)]


class ServiceThread:
    """The service and the emulated broker on an event loop of their own thread, so
    hypothesis (synchronous) drives them with blocking gRPC calls."""

    def __init__(self, harness: Harness) -> None:
        self.harness = harness
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def run(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def __enter__(self) -> ServiceThread:
        self._thread.start()
        self.run(self.harness.start())
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.run(self.harness.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[ServiceThread, Records]]:
    records = Records()
    logging.getLogger().addHandler(records)
    try:
        with ServiceThread(Harness(SqliteBackend(tmp_path), "v3", publish_deadline="2s")) as service:
            yield service, records
    finally:
        logging.getLogger().removeHandler(records)


def raw(channel: grpc.Channel, version: str, method: Any) -> Any:
    return channel.unary_unary(f"/emqx.exhook.{version}.HookProvider/{method.name}",
                               request_serializer=lambda b: b, response_deserializer=lambda b: b)


def tracebacks(records: Records) -> list[str]:
    return [f"{r.name}: {r.getMessage()}" for r in records.records
            if r.exc_info or r.exc_text or r.stack_info or "Traceback" in r.getMessage()]


def test_fuzzed_hook_calls_are_all_answered_and_the_service_still_stores(
        running: tuple[ServiceThread, Records]) -> None:
    service, records = running
    port = service.harness.grpc_port
    calls: dict[grpc.StatusCode, int] = {}
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        def answered(call: Any, request: Any) -> None:
            try:
                call(request, timeout=20)
                code = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                code = exc.code()
            calls[code] = calls.get(code, 0) + 1
            assert code in ANSWERED, (code, request if isinstance(request, bytes) else str(request)[:500])

        until = time.monotonic() + BUDGET_S

        @FUZZ
        @given(st.sampled_from(RPCS).flatmap(
            lambda vm: st.tuples(st.just(vm), fields_of(vm[1].input_type))))
        def typed(drawn: tuple[tuple[str, Any], dict[str, Any]]) -> None:
            (version, method), fields = drawn
            if time.monotonic() > until:
                return
            request = getattr(PB[version], method.input_type.name)(**fields)
            answered(raw(channel, version, method), request.SerializeToString())

        typed()

        until = time.monotonic() + BUDGET_S

        @FUZZ
        @given(st.sampled_from(RPCS), st.binary(max_size=600))
        def random_bytes(rpc: tuple[str, Any], data: bytes) -> None:
            if time.monotonic() > until:
                return
            answered(raw(channel, *rpc), data)

        random_bytes()

        assert calls.get(grpc.StatusCode.OK) and calls.get(grpc.StatusCode.INVALID_ARGUMENT), calls
        # no stall: the writer and the client queues settle, and a probe publish is stored
        service.run(service.harness.settle(), timeout=60)
        metrics = service.harness.service.metrics
        stored = metrics.sample("messages_stored_total")
        probe = message("v3", new_id(), "t/probe", b"after the fuzz")
        assert is_ignore("v3", stub(channel, "v3").OnMessagePublish(publish_request("v3", probe), timeout=10))
    assert metrics.sample("messages_stored_total") == stored + 1
    assert any(r.key == probe.id and r.payload == probe.payload
               for r in sqlite_rows(str(service.harness.backend.path)))  # type: ignore[attr-defined]
    # the handler saw the service's lines (the gate's warnings), so "no traceback" means something
    assert any(getattr(r, "event", "") == "request_rejected" for r in records.records)
    assert not tracebacks(records), tracebacks(records)[:5]
