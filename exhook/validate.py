"""What a hook request must look like to be right, checked once where it enters.

A broker never sends anything else, so a request that fails here is a bug, a
version mismatch or an attack: it is answered at once and nothing of it is stored
(``exhook.servicer``). The limits are EMQX's own: the message id is the broker's
128-bit GUID as 32 hex digits (``emqx_guid:to_hexstr``); topics, client ids and user
names are MQTT strings (at most 65,535 bytes of UTF-8, no NUL; a published topic has
no wildcard); QoS is 0, 1 or 2; timestamps are milliseconds since the epoch.

Each check returns a reason (the ``reason`` label of ``requests_rejected_total``)
or None.
"""

from __future__ import annotations

import re
from typing import Any

from exhook.topics import TopicError, real_filter, validate_filter

MAX_STRING_BYTES = 65535
# year 9999: a later "millisecond timestamp" is not one (and overflows SQL columns)
MAX_TIMESTAMP_MS = 253_402_300_799_999
_GUID = re.compile(r"[0-9A-Fa-f]{32}")


def _string_too_long(value: str) -> bool:
    # a character takes at most 4 bytes: skip the encoding for the usual short strings
    return len(value) * 4 > MAX_STRING_BYTES and len(value.encode("utf-8", "surrogatepass")) > MAX_STRING_BYTES


def topic_problem(topic: str) -> str | None:
    """A topic a message may be published to."""
    if not topic:
        return "bad_topic"
    if "\x00" in topic or "+" in topic or "#" in topic or _string_too_long(topic):
        return "bad_topic"
    return None


def is_guid(text: str) -> bool:
    """A message id as the broker writes it: 32 hex digits."""
    return _GUID.fullmatch(text) is not None


def message_problem(msg: Any) -> str | None:
    """The ``Message`` of a ``message.publish`` or ``message.acked`` request."""
    if not is_guid(msg.id):
        return "bad_msgid"
    if msg.qos > 2:
        return "bad_qos"
    if msg.timestamp > MAX_TIMESTAMP_MS:
        return "bad_timestamp"
    problem = topic_problem(msg.topic)
    if problem is not None:
        return problem
    sender = getattr(msg, "from")
    if "\x00" in sender or _string_too_long(sender):
        return "bad_sender"
    return None


def client_problem(info: Any) -> str | None:
    """The ``ClientInfo`` of a client or session hook."""
    clientid = info.clientid
    if not clientid or "\x00" in clientid or _string_too_long(clientid):
        return "bad_clientid"
    if "\x00" in info.username or _string_too_long(info.username):
        return "bad_username"
    return None


def filter_problem(topic: str) -> str | None:
    """A topic filter a session subscribed to or unsubscribed from (shared ones too)."""
    try:
        validate_filter(real_filter(topic))
    except TopicError:
        return "bad_filter"
    return None


def subscribed_problem(request: Any) -> str | None:
    if request.subopts.qos > 2:
        return "bad_qos"
    return client_problem(request.clientinfo) or filter_problem(request.topic)


def unsubscribed_problem(request: Any) -> str | None:
    return client_problem(request.clientinfo) or filter_problem(request.topic)


def acked_problem(request: Any) -> str | None:
    return message_problem(request.message) or client_problem(request.clientinfo)


def publish_problem(request: Any) -> str | None:
    return message_problem(request.message)


def client_hook_problem(request: Any) -> str | None:
    return client_problem(request.clientinfo)
