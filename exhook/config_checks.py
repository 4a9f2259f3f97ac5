"""What the config holds that must be treated with care: its secrets (masked in
every log line) and what is valid but almost certainly not meant (warnings)."""

from __future__ import annotations

import base64

from exhook.config import Config, MysqlConfig, RedisConfig, backend_name
from exhook.units import format_duration


def config_secrets(cfg: Config) -> tuple[str, ...]:
    """Values that must never appear in logs or printed config: the passwords, the
    API secret, and the secret as it travels (base64 of ``key:secret`` in the
    Authorization header, as an echoed request may show it)."""
    backend = cfg.backend
    password = backend.password if isinstance(backend, (RedisConfig, MysqlConfig)) else ""
    api = cfg.service.emqx
    token = base64.b64encode(f"{api.api_key}:{api.api_secret}".encode()).decode() if api.api_secret else ""
    return tuple(s for s in (password, api.api_secret, token) if s)


# The windows that pair late connect calls and find the sessions of dropped ones (30 s,
# missed_connects.py and hooks.py) hold calls the broker waited this long for.
HOOK_TIMEOUT_WINDOWS_MS = 25_000


def config_warnings(cfg: Config) -> tuple[str, ...]:
    """What is valid but almost certainly not meant: one line each, naming the field
    (logged at start-up, printed by check-config)."""
    out = []
    where = f"{backend_name(cfg.backend)}.topics"
    topics = cfg.backend.topics
    if not topics:
        out.append(f"{where} is empty: the backend is inactive, no hook is registered and nothing is stored")
    for flt in topics:
        if flt.startswith("$SYS/") or flt == "$SYS":
            out.append(f"{where}: {flt!r} never matches: EMQX does not pass $SYS messages to exhooks")
    if topics and all(flt.startswith("$SYS") for flt in topics):
        out.append(f"{where}: no filter can match a message: nothing will be stored")
    deadline, hook_timeout = cfg.service.publish_deadline_ms, cfg.service.emqx.hook_timeout_ms
    if deadline >= hook_timeout:
        out.append(f"exhook.publish_deadline {format_duration(deadline)} is not below exhook.emqx.hook_timeout "
                   f"({format_duration(hook_timeout)}, EMQX's request_timeout for this service): EMQX gives up on "
                   "message.publish first and applies its failed_action; keep it well below (the default is 500ms)")
    if hook_timeout > HOOK_TIMEOUT_WINDOWS_MS:
        out.append(f"exhook.emqx.hook_timeout {format_duration(hook_timeout)} is above "
                   f"{format_duration(HOOK_TIMEOUT_WINDOWS_MS)}: the restore of clients whose connect calls EMQX "
                   "gave up on looks back 30s (missed_connects.py), so some of them are restored only at their "
                   "next connect; a shorter request_timeout in EMQX suits a storm better")
    batch_time = cfg.backend.batch_time_ms
    if cfg.backend.batch_size > 1 and batch_time >= deadline:
        out.append(f"{backend_name(cfg.backend)}.batch_time {format_duration(batch_time)} is not below "
                   f"exhook.publish_deadline ({format_duration(deadline)}): a batch waiting for company can make "
                   "its publishes spill to the spool with the store healthy; keep it well below")
    if not cfg.service.emqx.api_key:
        out.append("exhook.emqx.api_key is empty: EMQX refuses replays and restores (401) until it is set "
                   "(an API key with the administrator role, e.g. through EMQX_API_KEY / EMQX_API_SECRET)")
    out += _short_secret_warnings(cfg)
    return tuple(out)


# Secrets are masked wherever their text appears in a log line: a very short one turns
# ordinary words into masks (and is weak anyway).
_SHORT_SECRET = 8


def _short_secret_warnings(cfg: Config) -> list[str]:
    backend = cfg.backend
    fields = [("exhook.emqx.api_secret", cfg.service.emqx.api_secret)]
    if isinstance(backend, (RedisConfig, MysqlConfig)):
        fields.append((f"{backend_name(backend)}.password", backend.password))
    return [f"{name} is shorter than {_SHORT_SECRET} characters: it is masked wherever its text appears in the "
            "logs, which garbles them (and it is easy to guess); use a longer one"
            for name, secret in fields if 0 < len(secret) < _SHORT_SECRET]
