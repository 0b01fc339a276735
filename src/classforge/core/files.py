"""Files classforge writes.

Text files that hold file names: a file name need not be valid UTF-8 (Linux allows any bytes); Python reads such
names with surrogate escapes, and these helpers write them back as the same bytes, so split.csv and
predictions.csv round-trip every path. HTML gets a replacement character instead (browsers need valid UTF-8).

Whole files replaced at once (`write_atomically`): caches and model.json, which other processes may read or write
at the same moment."""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path


def open_csv(path: str | Path, mode: str = "r"):
    return open(path, mode, newline="", encoding="utf-8", errors="surrogateescape")


def write_text_for_browser(path: str | Path, text: str) -> None:
    Path(path).write_text(text, encoding="utf-8", errors="replace")


def write_atomically(path: str | Path, data: bytes) -> None:
    """Write `data` to a file of this process and thread, then rename it over `path`: a reader sees the old file
    or the new one, never half of one, and processes writing the same path at once do not mix their bytes."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()  # there only when the write or the rename failed
