"""`classforge suggest`: what to label next."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import draw_sample, tree_checksums

import classforge
from classforge.training.suggest import pick


def test_pick_spreads_over_clusters_and_prefers_uncertain_files():
    rng = np.random.default_rng(0)
    centres = np.eye(4, 16) * 10
    x = np.concatenate([c + rng.standard_normal((20, 16)) * 0.1 for c in centres])  # 4 tight clusters of 20
    uncertainty = np.full(80, 0.5)
    uncertainty[25] = 0.9  # the most uncertain file of cluster 1
    labelled = centres[3:] + 0.01  # cluster 3 is labelled already
    order, dist = pick(x, labelled, uncertainty, 3, exclude={0})
    assert order[0] == 25
    assert sorted(i // 20 for i in order) == [0, 1, 2]  # one per unlabelled cluster, none from the labelled one
    assert 0 not in order and len(set(order)) == 3 and all(d > 0.5 for d in dist)
    everything, _ = pick(x, labelled, uncertainty, 100, exclude={0, 1})
    assert len(everything) == 78 and not {0, 1} & set(everything)


@pytest.mark.trains
def test_suggest_lists_files_to_label_and_skips_copies_of_labelled_ones(linear_run, shapes_dir, tmp_path):
    pool = tmp_path / "unlabelled"
    pool.mkdir()
    rng = np.random.default_rng(42)
    for i in range(12):
        draw_sample(("circle", "stripes", "checker")[i % 3], rng).save(pool / f"new_{i:02d}.png")
    with open(linear_run / "split.csv") as f:
        train = [r["path"] for r in csv.DictReader(f) if r["split"] == "train"]
    shutil.copy(shapes_dir / train[0], pool / "copy.png")
    (pool / "broken.png").write_bytes(b"\x89PNG not really")
    before = tree_checksums(pool)
    s = classforge.suggest(linear_run, pool, n=5, out=tmp_path / "out")
    assert s["files"] == 13 and s["suggested"] == 5 and s["near_copies_skipped"] == 1 and s["unreadable"] == 1
    with open(tmp_path / "out" / "suggestions.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["rank"]) for r in rows] == [1, 2, 3, 4, 5]
    assert len({r["path"] for r in rows}) == 5 and not any("copy" in r["path"] for r in rows)
    assert all(0 <= float(r["margin"]) <= 1 and r["predicted"] in ("circle", "stripes", "checker") for r in rows)
    html = (tmp_path / "out" / "suggestions.html").read_text()
    assert "copy.png" in html and "near copy of labelled" in html and html.count("<img") == 5
    assert tree_checksums(pool) == before  # the unlabelled folder is only read
    out = subprocess.run([sys.executable, "-m", "classforge.cli", "suggest", str(linear_run), str(pool), "--n", "2",
                          "--out", str(tmp_path / "cli")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "2 of 13 files suggested" in out.stdout
    assert json.loads((tmp_path / "cli" / "suggestions.json").read_text())["suggested"] == 2
