"""The "unknown" answer: the score's maths against references, and a run that says "unknown" for files of no
class through predict, the ONNX file, the CLI and the HTTP API."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ServerThread
from PIL import Image

import classforge
from classforge.models.open_set import MahalanobisScore, ledoit_wolf


@pytest.mark.parametrize("n,d", [(40, 8), (190, 300), (500, 64)])
def test_ledoit_wolf_matches_scikit_learn(n, d):
    from sklearn.covariance import LedoitWolf

    x = np.random.default_rng(n).standard_normal((n, d)) * np.linspace(0.2, 3.0, d)
    ref = LedoitWolf(assume_centered=True).fit(x).covariance_
    np.testing.assert_allclose(ledoit_wolf(x), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("d", [6, 300])  # more files than dimensions, and fewer (whitened through the Gram matrix)
def test_score_is_the_mahalanobis_distance_to_the_nearest_class_mean(d):
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 50)
    x = rng.standard_normal((150, d)) * np.linspace(0.3, 2.0, d) + 4 * np.eye(3, d)[y]
    score = MahalanobisScore.fit(x, y, 4)  # class 3 has no files: it must never be the nearest
    means = np.stack([x[y == c].mean(0) for c in range(3)])
    precision = np.linalg.inv(ledoit_wolf(x - means[y]))
    whiten = score.whiten.double().numpy()
    np.testing.assert_allclose(whiten @ whiten.T, precision, rtol=1e-4, atol=1e-6 * np.abs(precision).max())
    probe = rng.standard_normal((7, d)) * 3
    d2 = np.stack([np.einsum("nd,de,ne->n", probe - m, precision, probe - m) for m in means], 1)
    expected = np.sqrt(d2.min(1) / d)
    np.testing.assert_allclose(score(torch.from_numpy(probe).float()).numpy(), expected, rtol=1e-4)


def foreign_folder(root):
    """Files of none of the shapes classes: noise, flat colours and gradients."""
    rng = np.random.default_rng(3)
    root.mkdir(parents=True)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / f"noise_{i}.png")
        Image.new("RGB", (64, 64), tuple(int(v) for v in rng.integers(0, 256, 3))).save(root / f"flat_{i}.png")
        ramp = np.linspace(0, 255, 64, dtype=np.uint8)
        Image.fromarray(np.stack([np.tile(ramp, (64, 1))] * 3, -1)).rotate(30 * i).save(root / f"ramp_{i}.png")
    (root / "notes.txt").write_text("not an image: left out")
    return root


@pytest.fixture(scope="module")
def open_run(shapes_dir, tmp_path_factory):
    foreign = foreign_folder(tmp_path_factory.mktemp("foreign") / "none")
    run = classforge.train(shapes_dir, tmp_path_factory.mktemp("open") / "run", epochs=20, unknown_dir=str(foreign))
    return run, foreign


@pytest.mark.trains
def test_run_records_threshold_and_measures_files_of_no_class(open_run):
    run, foreign = open_run
    s = json.loads((run / "summary.json").read_text())["open_set"]
    meta = json.loads((run / "model.json").read_text())["open_set"]
    assert meta["threshold"] == pytest.approx(s["threshold"]) and meta["target_recall"] == 0.95
    assert s["unknown_files"] == 36  # the text file is not an image
    assert s["val_known_recall"] >= 0.9 and s["test_known_recall"] >= 0.8
    assert s["auroc"] > 0.95 and s["false_accept"] < 0.2
    assert (run / "open_set.png").stat().st_size > 5000
    html = (run / "report.html").read_text()
    assert "Unknown inputs" in html and "AUROC" in html
    with open(run / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    flagged = [r for r in rows if r["unknown"] == "1"]
    assert all(float(r["unknown_score"]) > s["threshold"] for r in flagged)
    assert len(flagged) / len(rows) == pytest.approx(1 - s["test_known_recall"], abs=1e-6)


@pytest.mark.trains
def test_predict_answers_unknown_and_can_be_told_not_to(open_run):
    run, foreign = open_run
    files = sorted(foreign.glob("noise_*.png"))[:4]
    answers = classforge.predict(run, files)
    assert all(a["label"] == "unknown" and a["unknown"] for a in answers)
    assert all(a["best_label"] in ("circle", "stripes", "checker") for a in answers)
    assert [a["best_label"] for a in answers] == [a["top_k"][0]["label"] for a in answers]
    plain = classforge.predict(run, files, unknown=False)
    assert [p["label"] for p in plain] == [a["best_label"] for a in answers]
    assert not any(p["unknown"] for p in plain)


@pytest.mark.trains
def test_cli_says_unknown_and_no_unknown_turns_it_off(open_run):
    run, foreign = open_run
    f = str(sorted(foreign.glob("noise_*.png"))[0])
    cmd = [sys.executable, "-m", "classforge.cli", "predict", str(run), f, "--json"]
    out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    assert out[0]["label"] == "unknown"
    out = json.loads(subprocess.run(cmd + ["--no-unknown"], capture_output=True, text=True, check=True).stdout)
    assert out[0]["label"] in ("circle", "stripes", "checker") and out[0]["unknown"] is False


@pytest.mark.trains
def test_exported_onnx_gives_the_same_scores_and_answers(open_run, tmp_path):
    import shutil

    import onnxruntime as ort

    run = tmp_path / "run"
    shutil.copytree(open_run[0], run)
    classforge.export(run, model_card=False)
    session = ort.InferenceSession(str(run / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["logits", "unknown_score"]
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["classforge.open_set"])["threshold"] == pytest.approx(
        json.loads((run / "model.json").read_text())["open_set"]["threshold"])
    files = sorted(open_run[1].glob("*.png"))[::6]
    onnx = classforge.load(run, backend="onnx")
    torch_ = classforge.load(run, backend="torch")
    a, b = onnx.predict(files), torch_.predict(files)
    assert [r["label"] for r in a] == [r["label"] for r in b]
    np.testing.assert_allclose([r["unknown_score"] for r in a], [r["unknown_score"] for r in b], atol=1e-3)


@pytest.mark.trains
def test_http_api_answers_unknown_unless_told_not_to(open_run):
    import base64

    import requests

    run, foreign = open_run
    data = sorted(foreign.glob("noise_*.png"))[0].read_bytes()
    from classforge.serve.api import create_app

    with ServerThread(create_app(run, ui=False)) as srv:
        r = requests.post(f"{srv.url}/predict", files={"file": ("n.png", data, "image/png")}, timeout=60).json()
        assert r["results"][0]["label"] == "unknown" and r["results"][0]["best_label"]
        r = requests.post(f"{srv.url}/predict?unknown=false", files={"file": ("n.png", data, "image/png")},
                          timeout=60).json()
        assert r["results"][0]["label"] == r["results"][0]["top_k"][0]["label"]
        body = {"data": base64.b64encode(data).decode(), "unknown": False}
        r = requests.post(f"{srv.url}/predict", json=body, timeout=60).json()
        assert r["results"][0]["label"] != "unknown"
        bad = requests.post(f"{srv.url}/predict", json={**body, "unknown": "maybe"}, timeout=60)
        assert bad.status_code == 422 and "unknown" in bad.json()["error"]


@pytest.mark.trains
def test_unknown_recall_zero_keeps_the_closed_set_answer(shapes_dir, tmp_path):
    run = classforge.train(shapes_dir, tmp_path / "closed", epochs=5, unknown_recall=0)
    assert "open_set" not in json.loads((run / "model.json").read_text())
    assert "open_set" not in json.loads((run / "summary.json").read_text())
    r = classforge.predict(run, next(shapes_dir.rglob("*.png")))
    assert "unknown" not in r and r["label"] in ("circle", "stripes", "checker")


@pytest.mark.trains
def test_a_network_trained_end_to_end_gets_its_score_from_its_own_features(tiny, tmp_path):
    run = classforge.train(tiny, tmp_path / "scratch", backbone="cnn_small", strategy="scratch", epochs=3)
    meta = json.loads((run / "model.json").read_text())["open_set"]
    assert meta["fitted_on_files"] > 0 and meta["threshold"] > 0
    r = classforge.predict(run, next(tiny.rglob("*.png")))
    assert r["unknown_score"] >= 0 and isinstance(r["unknown"], bool)
