"""Integration on real data from ../shared/datasets (skipped cleanly when it is absent)."""

from __future__ import annotations

import csv
import json
from collections import defaultdict

import pytest
from conftest import shared_path, tree_checksums

import classforge

pytestmark = pytest.mark.slow


def test_hymenoptera_default_linear_reaches_090_on_official_val(tmp_path):
    data = shared_path("datasets", "hymenoptera")
    run = classforge.train(data, tmp_path / "hym")
    s = json.loads((run / "summary.json").read_text())
    assert s["test"]["n"] == 153  # the official val/ folder, reported as the test set
    assert s["test"]["accuracy"] >= 0.90, s["test"]
    with open(run / "split.csv") as f:
        rows = list(csv.DictReader(f))
    assert all(r["path"].startswith("val/") for r in rows if r["split"] == "test")
    assert all(r["path"].startswith("train/") for r in rows if r["split"] in ("train", "val"))


def test_pokemon_families_held_out_no_duplicate_straddles(tmp_path):
    """Group-aware split by game family (from manifest.csv via a labels CSV): whole families per split,
    and no exact pixel duplicate (manifest's exact_duplicate_of) lands in two splits."""
    root = shared_path("datasets", "pokemon_gen1_sprites")
    before = tree_checksums(root)
    with open(root / "manifest.csv") as f:
        manifest = list(csv.DictReader(f))
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "group"])
        for r in manifest:
            if r["class"] in {"001_bulbasaur", "004_charmander", "007_squirtle", "025_pikachu", "039_jigglypuff",
                              "052_meowth", "054_psyduck", "094_gengar", "129_magikarp", "143_snorlax"}:
                w.writerow([r["path"], r["class"], r["family"]])
    run = classforge.train(root, tmp_path / "poke", labels_csv=str(labels), epochs=40)
    with open(run / "split.csv") as f:
        split = {r["path"]: r for r in csv.DictReader(f)}
    families = defaultdict(set)
    for r in split.values():
        families[r["group"]].add(r["split"])
    assert all(len(v) == 1 for v in families.values()), families
    for r in manifest:
        dup = r["exact_duplicate_of"]
        if dup and r["path"] in split and dup in split:
            assert split[r["path"]]["split"] == split[dup]["split"]
    s = json.loads((run / "summary.json").read_text())
    assert s["test"]["n"] > 0 and s["test"]["accuracy"] > 0.3  # 10 classes: chance is 0.1
    assert tree_checksums(root) == before
