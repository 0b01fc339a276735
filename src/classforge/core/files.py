"""Text files that hold file names. A file name need not be valid UTF-8 (Linux allows any bytes); Python reads
such names with surrogate escapes, and these helpers write them back as the same bytes, so split.csv and
predictions.csv round-trip every path. HTML gets a replacement character instead (browsers need valid UTF-8)."""

from __future__ import annotations

from pathlib import Path


def open_csv(path: str | Path, mode: str = "r"):
    return open(path, mode, newline="", encoding="utf-8", errors="surrogateescape")


def write_text_for_browser(path: str | Path, text: str) -> None:
    Path(path).write_text(text, encoding="utf-8", errors="replace")
