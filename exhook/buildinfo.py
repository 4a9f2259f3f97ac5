"""What this build is: the package's version and the runtime it runs on
(``offline-exhook --version`` and the ``build_info`` metric)."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

PACKAGE = "offline-exhook"


def _installed(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def build_info() -> dict[str, str]:
    """``{"version", "python", "grpc"}``: the labels of ``offline_exhook_build_info``."""
    return {"version": _installed(PACKAGE), "python": platform.python_version(), "grpc": _installed("grpcio")}


def version_line() -> str:
    info = build_info()
    return f"{PACKAGE} {info['version']} (python {info['python']}, grpcio {info['grpc']})"
