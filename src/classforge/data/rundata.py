"""Where a run's data files are on this machine: the data folder a run names, and its files per split."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from classforge.core.config import load_yaml
from classforge.core.files import open_csv
from classforge.data.discover import resolve_root


def data_root(run: Path) -> Path | None:
    """The folder split.csv paths are relative to: summary.json "data", else config.yaml `data`/labels_csv."""
    data, labels_csv = None, None
    if (run / "summary.json").is_file():
        data = json.loads((run / "summary.json").read_text()).get("data")
    if not data and (run / "config.yaml").is_file():
        cfg = load_yaml((run / "config.yaml").read_text()) or {}
        data, labels_csv = cfg.get("data"), cfg.get("labels_csv")
    if data:
        p = Path(data)
        if p.is_dir():
            return p
        if p.is_file():  # an archive: discovery extracted it into the cache once
            try:
                return resolve_root(p)
            except Exception:  # noqa: BLE001 - a broken archive only means "no real files"
                return None
        return None
    return Path(labels_csv).resolve().parent if labels_csv else None


def run_files(run: str | Path, splits=("test",)) -> list[tuple[Path, str, str]]:
    """(absolute path, label, split) of the run's files in `splits` (in that order) that exist on this machine."""
    run = Path(run)
    root = data_root(run)
    if root is None or not (run / "split.csv").is_file():
        return []
    with open_csv(run / "split.csv") as f:
        rows = list(csv.DictReader(f))
    out = []
    for split in splits:
        for r in rows:
            if r.get("split") == split and (root / r["path"]).is_file():
                out.append((root / r["path"], r["label"], split))
    return out

