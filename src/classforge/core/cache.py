"""The on-disk cache (embeddings, extracted archives, audio variants): CLASSFORGE_CACHE or ~/.cache/classforge."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    d = Path(os.environ.get("CLASSFORGE_CACHE", Path.home() / ".cache" / "classforge"))
    d.mkdir(parents=True, exist_ok=True)
    return d
