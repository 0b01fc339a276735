"""`classforge update`: new classes and files into a run without training it again."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import tree_checksums
from PIL import Image, ImageDraw
from safetensors.torch import load_file

import classforge
from classforge.core.errors import ClassforgeError


def add_triangles(root, n=24, seed=5):
    rng = np.random.default_rng(seed)
    (root / "triangle").mkdir()
    for i in range(n):
        img = Image.new("RGB", (64, 64), tuple(int(v) for v in rng.integers(150, 256, 3)))
        a, b, c = (tuple(int(v) for v in rng.integers(4, 60, 2)) for _ in range(3))
        ImageDraw.Draw(img).polygon([a, b, c], fill=tuple(int(v) for v in rng.integers(0, 110, 3)))
        img.save(root / "triangle" / f"triangle_{i:03d}.png")


def splits(run):
    with open(run / "split.csv") as f:
        return {r["path"]: r["split"] for r in csv.DictReader(f)}


@pytest.fixture(scope="module")
def grown(shapes_dir, linear_run, tmp_path_factory):
    data = tmp_path_factory.mktemp("grown") / "shapes"
    shutil.copytree(shapes_dir, data)
    add_triangles(data)
    before = {"run": tree_checksums(linear_run), "data": tree_checksums(data)}
    new = classforge.update(linear_run, str(data), tmp_path_factory.mktemp("updated") / "run")
    return data, new, before


@pytest.mark.trains
def test_new_class_is_added_and_old_files_keep_their_split(grown, linear_run):
    data, new, before = grown
    old_labels = json.loads((linear_run / "labels.json").read_text())
    assert json.loads((new / "labels.json").read_text()) == old_labels + ["triangle"]
    old_split, new_split = splits(linear_run), splits(new)
    assert all(new_split[p] == sp for p, sp in old_split.items())
    added = {p: sp for p, sp in new_split.items() if p not in old_split}
    assert len(added) == 24 and all(p.startswith("triangle/") for p in added)
    assert {"train", "val", "test"} <= set(added.values())  # split as a fresh run would
    s = json.loads((new / "summary.json").read_text())
    u = s["update"]
    assert u["classes_added"] == ["triangle"] and u["files_added"] == 24 and u["old_rows"] == "kept"
    assert u["old_test_files"] == sum(sp == "test" for sp in old_split.values())
    assert u["new_classes_test_accuracy"] >= 0.5
    assert s["embeddings"]["cached"] >= len(old_split)  # the old files were not embedded again
    assert "What changed" in (new / "report.html").read_text()
    # nothing written into the old run or the data
    assert tree_checksums(linear_run) == before["run"] and tree_checksums(data) == before["data"]


@pytest.mark.trains
def test_old_classes_weights_stay_exactly_when_only_new_classes_arrive(grown, linear_run):
    _, new, _ = grown
    old, now = load_file(str(linear_run / "model.safetensors")), load_file(str(new / "model.safetensors"))
    k = old["head.weight"].shape[0]
    assert torch.equal(now["head.weight"][:k], old["head.weight"])
    assert torch.equal(now["head.bias"][:k], old["head.bias"])
    assert now["head.weight"].shape[0] == k + 1 and now["head.weight"][k].abs().sum() > 0
    # the old run's predictions on its test files are the new run's wherever the new class does not win
    with open(linear_run / "predictions.csv") as f:
        before = {r["path"]: r["predicted"] for r in csv.DictReader(f)}
    with open(new / "predictions.csv") as f:
        after = {r["path"]: r["predicted"] for r in csv.DictReader(f)}
    assert all(after[p] in (before[p], "triangle") for p in before)


@pytest.mark.trains
def test_new_files_of_old_classes_refit_every_row(shapes_dir, linear_run, tmp_path):
    from conftest import draw_sample

    data = tmp_path / "more"
    shutil.copytree(shapes_dir, data)
    rng = np.random.default_rng(9)
    for i in range(6):
        draw_sample("circle", rng).save(data / "circle" / f"extra_{i}.png")
    new = classforge.update(linear_run, str(data), tmp_path / "run")
    u = json.loads((new / "summary.json").read_text())["update"]
    assert u["classes_added"] == [] and u["files_added"] == 6 and u["old_rows"] == "refit"
    assert json.loads((new / "labels.json").read_text()) == json.loads((linear_run / "labels.json").read_text())


@pytest.mark.trains
def test_update_refuses_what_it_cannot_do(linear_run, tiny, tmp_path):
    with pytest.raises(ClassforgeError, match="new folder"):
        classforge.update(linear_run, None, linear_run)
    scratch = classforge.train(tiny, tmp_path / "scratch", backbone="cnn_small", strategy="scratch", epochs=1)
    with pytest.raises(ClassforgeError, match="scratch run.*train again"):
        classforge.update(scratch, None, tmp_path / "nope")
    out = subprocess.run([sys.executable, "-m", "classforge.cli", "update", str(scratch), "--out",
                          str(tmp_path / "nope")], capture_output=True, text=True)
    assert out.returncode == 2 and "train again" in out.stdout + out.stderr and "Traceback" not in out.stderr


def test_fit_head_keeps_frozen_rows_exactly():
    from classforge.core.config import TrainConfig
    from classforge.training.head import fit_head

    rng = np.random.default_rng(0)
    x = rng.standard_normal((90, 5)).astype(np.float32) + np.repeat(np.eye(3, 5) * 3, 30, 0)
    y = np.repeat([0, 1, 2], 30)
    head = torch.nn.Linear(5, 3)
    w0, b0 = head.weight.detach().clone(), head.bias.detach().clone()
    fit_head(head, x, y, x[:0], y[:0], TrainConfig(epochs=20), None, warm_start=True, frozen_rows=2)
    assert torch.equal(head.weight[:2], w0[:2]) and torch.equal(head.bias[:2], b0[:2])
    assert not torch.equal(head.weight[2], w0[2])
