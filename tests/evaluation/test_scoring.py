"""A linear run scores val and test from the logits its head gave the cached features when the extraction
engine is exact (fp32), after checking a few files against the Predictor; the figures stay the shipped model's."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

import classforge
from classforge.runtime import predictor as predictor_module

pytestmark = pytest.mark.trains


def test_exact_engine_scores_from_cached_features(shapes_dir, tmp_path, monkeypatch):
    scored = []
    real = predictor_module.Predictor.preprocess  # every file the predictor scores goes through it

    def counting(self, src):
        scored.append(src)
        return real(self, src)

    monkeypatch.setattr(predictor_module.Predictor, "preprocess", counting)
    run = classforge.train(shapes_dir, tmp_path / "r", epochs=20, extract_engine="onnx", eval_engine="torch")
    s = json.loads((run / "summary.json").read_text())
    check = s["evaluation"]["cached_features"]
    k = min(8, s["test"]["n"])
    assert check["passed"] and check["files_checked"] == k and check["max_abs_logit_diff"] < 1e-3
    assert len(scored) == k  # the predictor ran on the parity files only (once), not on every val and test file
    # the reported figures are what the shipped model gives: score every test file through it here
    monkeypatch.setattr(predictor_module.Predictor, "preprocess", real)
    with open(run / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    data = s["data"]
    probs = classforge.load(run, backend="torch").predict_proba([f"{data}/{r['path']}" for r in rows])
    labels = json.loads((run / "labels.json").read_text())
    acc = float(np.mean([labels[i] == r["true"] for i, r in zip(probs.argmax(1), rows)]))
    assert s["test"]["accuracy"] == pytest.approx(acc, abs=1e-9)


def test_the_parity_reference_is_what_the_predictor_outputs(shapes_dir):
    """The parity check compares the cached features' scores with the shipped head applied to the predictor's
    features of the same files, computed while the run waits: that must be what the Predictor itself outputs
    for those files, unknown score included."""
    import torch

    from classforge.core.config import TrainConfig
    from classforge.data.discover import discover_for
    from classforge.evaluation.evaluate import predictor_features
    from classforge.models.open_set import MahalanobisScore
    from classforge.models.registry import Classifier, create_backbone
    from classforge.training.flow import head_outputs

    files = [s.path for s in discover_for(TrainConfig().replace(data=str(shapes_dir))).samples][:8]
    torch.manual_seed(0)
    model = Classifier(create_backbone("efficientnet_lite0"), 3)
    model.open_set = MahalanobisScore.fit(torch.randn(40, model.backbone.feature_dim).numpy(), np.arange(40) % 3, 3)
    reference = head_outputs(model, predictor_features(model.backbone, files, 10**8).result())
    direct = predictor_module.Predictor(model, model.backbone.spec, ["a", "b", "c"]).predict_outputs(files)
    assert reference.shape == direct.shape == (8, 4)
    np.testing.assert_allclose(reference, direct, rtol=0, atol=1e-5)


def test_inexact_features_are_not_used_for_scores(shapes_dir, tmp_path, monkeypatch):
    """A failed parity check (features that are not the shipped model's) falls back to scoring every file."""
    from classforge.evaluation import evaluate

    monkeypatch.setattr(evaluate, "parity", lambda ref, out, **kw: {"max_abs_diff": 1.0, "passed": False})
    run = classforge.train(shapes_dir, tmp_path / "r", epochs=5, extract_engine="onnx", eval_engine="torch")
    s = json.loads((run / "summary.json").read_text())
    assert s["evaluation"]["cached_features"]["passed"] is False
    assert s["test"]["n"] > 0


def test_default_run_embeds_val_and_test_exactly_and_scores_once(shapes_dir, tmp_path):
    """Whatever engine embeds the training files (bf16 where the CPU has it), val and test are embedded by an
    exact fp32 engine, so the default linear run scores from them."""
    run = classforge.train(shapes_dir, tmp_path / "r", epochs=20)
    s = json.loads((run / "summary.json").read_text())
    assert s["embeddings"]["scoring_engine"] == "onnx"
    assert s["evaluation"]["cached_features"]["passed"] and s["evaluation"]["cached_features"]["engine"] == "onnx"
    assert s["test"]["accuracy"] >= 0.9


def test_runs_say_when_training_stopped_early_or_the_result_is_chance(tiny, tmp_path):
    """A budget that ends inside the first epoch, and a result chance would reach, are said on the console, in
    summary.json and at the top of the report."""
    from classforge.evaluation.metrics import run_warnings

    summary = {"trainer": {"epochs_run": 0, "stopped_by": "time budget"}, "test": {"accuracy": 0.36,
                                                                                  "accuracy_ci95": [0.2, 0.5]}}
    said = run_warnings(summary, np.array([0, 0, 0, 1, 1, 2]))
    assert len(said) == 2 and "before one full epoch" in said[0] and "chance (0.500" in said[1]
    ok = {"trainer": {"epochs_run": 5}, "test": {"accuracy": 0.98, "accuracy_ci95": [0.9, 1.0]}}
    assert run_warnings(ok, np.array([0, 1, 2] * 10)) == []
    # a network that learns nothing (a learning rate of 1e-9) scores at chance: said in summary.json and the report
    run = classforge.train(tiny, tmp_path / "r", backbone="cnn_small", strategy="scratch", epochs=1, lr="1e-9",
                           split="0.4,0.2,0.4")
    s = json.loads((run / "summary.json").read_text())
    assert any("within reach of chance" in w for w in s["warnings"]), s["test"]
    assert "Warning:</b> test accuracy" in (run / "report.html").read_text()


def test_ordered_bins_count_near_misses():
    from classforge.evaluation.metrics import bin_order, ordinal_metrics

    labels = ["10-20", "0-10", "20+", "10-"]  # --bins names, in any order; '10-' is no bin name
    assert bin_order(labels[:3]) == [1, 0, 2] and bin_order(labels) is None and bin_order(["cat", "dog"]) is None
    y = np.array([0, 1, 2, 2])  # true ranks 1, 0, 2, 2
    probs = np.eye(3)[[0, 2, 2, 1]]  # predicted 10-20 (right), 20+ (two off), 20+ (right), 0-10 (two off)
    o = ordinal_metrics(labels[:3], y, probs)
    assert o == {"within_one_bin": 0.5, "mean_abs_bin_error": 1.0}


def test_binned_run_reports_within_one_bin(tmp_path):
    """A run on numeric labels with --bins: summary.json and the report give the near-miss figures too."""
    from conftest import draw_sample

    rng = np.random.default_rng(0)
    for i in range(60):  # the label is the number of stripes: 0-2 / 2-4 / 4+ from three kinds
        kind, age = [("circle", 1), ("stripes", 3), ("checker", 5)][i % 3]
        draw_sample(kind, rng).save(tmp_path / f"{age}_{i:03d}.png")
    run = classforge.train(tmp_path, tmp_path.parent / "binned", label_from_name=r"^(?P<label>\d+)_",
                           bins="0,2,4", epochs=20)
    s = json.loads((run / "summary.json").read_text())
    o = s["test"]["ordinal"]
    assert 0 <= o["mean_abs_bin_error"] <= 2 and o["within_one_bin"] >= s["test"]["accuracy"]
    assert "within one bin" in (run / "report.html").read_text()


def test_many_classes_get_a_readable_confusion_view(tmp_path):
    """151 classes: the plot keeps the 30 most confused, labelled; the pairs table names the worst pairs."""
    from classforge.evaluation.report import confused_pairs, most_confused_classes, plot_confusion

    n = 151
    cm = np.diag(np.full(n, 10))
    cm[5, 5], cm[5, 140] = 4, 6  # class 5 is mostly taken for class 140
    cm[77, 77], cm[77, 3] = 8, 2
    keep = most_confused_classes(cm)
    assert len(keep) == 30 and {5, 140, 77, 3} <= set(keep) and keep == sorted(keep)
    labels = [f"c{i:03d}" for i in range(n)]
    assert confused_pairs(cm, labels)[:2] == [["c005", "c140", 6, "60.0%"], ["c077", "c003", 2, "20.0%"]]
    plot_confusion(tmp_path / "cm.png", cm, labels)
    assert (tmp_path / "cm.png").stat().st_size > 10_000
