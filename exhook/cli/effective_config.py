"""check-config: the effective configuration, every field with its default filled in.

Rendered with the config file's own field names, so the output is itself a valid config
file: HOCON by default, JSON with ``--json`` (HOCON reads JSON too). Secrets
(``password``, ``api_secret``; see ``exhook.config.config_secrets``) are shown as
``******``. The typed config (exhook/config.py) differs from the file in a few names,
mapped back here: ``*_ms`` fields are durations (``"500ms"``, ``"5s"``), ``emqx.url`` is
``api_url``, the SQL templates are fields of the ``mysql`` block, TLS verify flags are
``verify_peer`` / ``verify_none``, addresses are ``host:port`` strings. The walk is
generic over the dataclasses, so a field added to the config shows up without a change
here (a round-trip test parses the output back).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from exhook.config import Config, EmqxApiConfig, HostPort, backend_name
from exhook.config_fields import SECRET_FIELDS
from exhook.logs import MASK
from exhook.units import format_duration

# (dataclass, field) -> name in the config file, where they differ
_RENAMES: dict[tuple[type, str], str] = {(EmqxApiConfig, "url"): "api_url"}


def effective_tree(cfg: Config) -> dict[str, Any]:
    """``{"exhook": {...}, "<backend>": {"enable": true, ...}}`` in the file's field names."""
    return {"exhook": _struct(cfg.service), backend_name(cfg.backend): {"enable": True, **_struct(cfg.backend)}}


def render_hocon(tree: dict[str, Any], indent: int = 0) -> list[str]:
    pad = "  " * indent
    lines: list[str] = []
    for key, value in tree.items():
        if isinstance(value, dict):
            lines.append(f"{pad}{key} {{")
            lines += render_hocon(value, indent + 1)
            lines.append(f"{pad}}}")
        else:
            # a quoted HOCON string is literal (no ${...} substitution), and JSON escapes are HOCON's
            lines.append(f"{pad}{key} = {json.dumps(value, ensure_ascii=False)}")
    return lines


def render(cfg: Config, as_json: bool, source: str) -> str:
    tree = effective_tree(cfg)
    if as_json:
        return json.dumps(tree, indent=2, ensure_ascii=False)
    head = f"# effective configuration of {source} (defaults filled in, secrets masked)"
    return "\n".join([head, *render_hocon(tree)])


def _struct(obj: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = _RENAMES.get((type(obj), f.name), f.name)
        if f.name == "sql" and isinstance(value, dict):
            out.update(value)  # mysql.insert_message_sql etc. are fields of the block itself
            continue
        if f.name in SECRET_FIELDS:
            out[key] = MASK if value else ""
            continue
        if key.endswith("_ms") and isinstance(value, int) and not isinstance(value, bool):
            out[key[:-3]] = format_duration(value)
            continue
        if key in ("verify", "verify_peer") and isinstance(value, bool):
            # SslOptions.verify and ServerTlsConfig.verify_peer are both `verify` in the file
            out["verify"] = "verify_peer" if value else "verify_none"
            continue
        out[key] = _value(value)
    return out


def _value(value: Any) -> Any:
    if isinstance(value, HostPort):
        return str(value)
    if isinstance(value, tuple):
        if value and all(isinstance(v, HostPort) for v in value):
            return ",".join(str(v) for v in value)  # redis.servers
        return [_value(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _struct(value)
    return value
