"""Where a run's training checkpoints, logs and epoch journal live: the cache, never the run folder.

Lightning checkpoints are pickles, and the run folder is promised to load without any. They are kept while a
run may be resumed (after a crash or a kill) and removed once it succeeds, unless --keep-checkpoints. This module
imports nothing heavy: the linear path asks where checkpoints are without loading Lightning."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from classforge.core.cache import cache_dir


def checkpoint_dir(run: Path) -> Path:
    """Where a run's training checkpoints and logs live: in the cache, keyed by the run folder's path, never in
    the run folder (Lightning checkpoints are pickles; the run folder loads without any). Removed when the run
    succeeds unless --keep-checkpoints; kept after a crash for --resume."""
    key = hashlib.sha1(str(Path(run).resolve()).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return cache_dir() / "checkpoints" / f"{Path(run).name[:40]}-{key}"


def journal_path(run: Path) -> Path:
    """Each epoch's history row, written as it comes: what --resume puts back before the epochs it adds."""
    return checkpoint_dir(run) / "history.jsonl"


def read_journal(run: Path, stage: str) -> list[dict]:
    """The rows of `stage` a previous (perhaps killed) run recorded; unreadable lines are left out."""
    rows = []
    try:
        lines = journal_path(run).read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut off by the kill
        if isinstance(row, dict) and row.get("stage") == stage:
            rows.append(row)
    return rows
