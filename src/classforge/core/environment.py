"""The software and machine a run used (summary.json), read from package metadata: importing Lightning or timm
only to print their versions would cost seconds on paths that never use them."""

from __future__ import annotations

import os
import platform
from importlib import metadata


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    return {"python": platform.python_version(), "torch": _version("torch"), "timm": _version("timm"),
            "lightning": _version("lightning"), "machine": platform.machine(), "cpus": os.cpu_count()}
