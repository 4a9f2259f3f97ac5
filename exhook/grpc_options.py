"""Channel arguments of the service's gRPC server.

Why the pending-call limits matter (issue 14): grpc.aio asks the C-core for the next
call of a method only after the event loop has taken the previous one, so a burst of
calls (thousands of clients reconnecting at once) waits in the C-core's queue of
calls not yet requested by the application. The C-core protects that queue with
random early rejection: above ``grpc.server.max_pending_requests`` (default 1000)
queued calls it rejects a growing share of new ones, above the hard limit (default
3000) all of them. A rejected call ends at once with status CANCELLED, which EMQX logs
as ``exhook_call_error ... {cancelled,<<"CANCELLED">>}`` and then carries on without
the hook: for ``client.connected`` that client's subscriptions are never restored.

A queued call costs about 12 KB (measured: a no-op server's peak RSS grew by ~120 MB
for a burst of 10,000 calls). One process answers roughly 5,000-8,000 hook calls a
second, so about 20,000 queued calls are what it can still answer within EMQX's
default ``request_timeout`` of 5 s. Beyond that a call could only time out, and
failing it fast is kinder to the broker than holding a CONNACK for the full timeout.
"""

from __future__ import annotations

MAX_MESSAGE_BYTES = 256 * 1024 * 1024
# soft = hard: no random rejection below the limit, every call beyond it is refused
MAX_PENDING_CALLS = 20_000


def server_options(reuse_port: bool) -> list[tuple[str, int]]:
    return [
        # grpc shares a port by default; only the service's own workers may
        ("grpc.so_reuseport", 1 if reuse_port else 0),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
        ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING_CALLS),
    ]
