"""classforge audit: flipped labels rank first, duplicates with different labels and outliers are named, the
corrected labels CSV trains, and the data folder is only read."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
from conftest import make_image_folder, tree_checksums

import classforge

pytest.importorskip("cleanlab")

FLIPPED = {"circle/circle_003.png": "stripes", "stripes/stripes_007.png": "checker",
           "checker/checker_011.png": "circle", "circle/circle_015.png": "checker"}


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    root = make_image_folder(tmp_path_factory.mktemp("audit") / "d", 20, kinds=("circle", "stripes", "checker"))
    shutil.copy(root / "stripes" / "stripes_001.png", root / "circle" / "copy_of_stripes.png")  # same file, 2 labels
    labels = root.parent / "labels.csv"
    with open(labels, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        for p in sorted(root.rglob("*.png")):
            rel = p.relative_to(root).as_posix()
            w.writerow([rel, FLIPPED.get(rel, p.parent.name)])
    return root, labels


def test_audit_ranks_flipped_labels_first_and_writes_what_it_found(noisy, tmp_path):
    root, labels = noisy
    before = tree_checksums(root)
    s = classforge.audit(root, tmp_path / "a", labels_csv=str(labels), accept_top=len(FLIPPED) + 2)
    with open(tmp_path / "a" / "audit.csv") as f:
        rows = list(csv.DictReader(f))
    top = [r["path"] for r in rows if r["reason"].startswith("label issue")][: 2 * len(FLIPPED)]
    assert set(FLIPPED) <= set(top)  # every flipped file among the first 2 x (number flipped) suspects
    for r in rows:
        if r["path"] in FLIPPED:
            assert r["given_label"] == FLIPPED[r["path"]] and r["suggested_label"] == r["path"].split("/")[0]
    dup = [r for r in rows if r["reason"].startswith("near-duplicate")]
    assert {"circle/copy_of_stripes.png", "stripes/stripes_001.png"} <= {r["path"] for r in dup}
    assert s["outliers"] >= 1 and s["label_issues"] >= len(FLIPPED) and s["folds"] == 5
    html = (tmp_path / "a" / "audit.html").read_text()
    assert "Suspect labels" in html and html.count("<img") >= len(FLIPPED)
    # corrected_labels.csv is a --labels-csv with the first suggestions applied: it trains
    with open(tmp_path / "a" / "corrected_labels.csv") as f:
        fixed = {r["path"]: r["label"] for r in csv.DictReader(f)}
    assert s["accepted"] == len(FLIPPED) + 2
    assert all(fixed[p] == p.split("/")[0] for p in FLIPPED)  # each flipped file back to its true class
    run = classforge.train(root, tmp_path / "run", labels_csv=str(tmp_path / "a" / "corrected_labels.csv"), epochs=5)
    assert json.loads((run / "summary.json").read_text())["classes"] == 3
    assert tree_checksums(root) == before


def test_audit_command_and_its_errors(noisy, tmp_path):
    import subprocess
    import sys

    root, labels = noisy
    out = subprocess.run([sys.executable, "-m", "classforge.cli", "audit", str(root), "--labels-csv", str(labels),
                          "--out", str(tmp_path / "a"), "--folds", "3"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "suspect labels" in out.stdout and "audit.csv" in out.stdout
    one = make_image_folder(tmp_path / "one", 6, kinds=("circle",))
    bad = subprocess.run([sys.executable, "-m", "classforge.cli", "audit", str(one), "--out", str(tmp_path / "b")],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "at least 2 classes" in bad.stdout + bad.stderr and "Traceback" not in bad.stderr
