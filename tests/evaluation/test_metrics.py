"""Our metrics against scikit-learn (the trusted reference)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_fscore_support,
)

from classforge.evaluation.metrics import expected_calibration_error, summarize, wilson_interval


def _fake(n=500, c=4, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c)) + 2.0 * np.eye(c)[y] * rng.random((n, 1))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, p


def test_summary_matches_sklearn():
    y, p = _fake()
    m = summarize(y, p, 4)
    pred = p.argmax(1)
    assert np.isclose(m["accuracy"], accuracy_score(y, pred))
    assert np.isclose(m["macro_f1"], f1_score(y, pred, average="macro"))
    assert np.isclose(m["log_loss"], log_loss(y, p), atol=1e-6)
    assert (m["confusion"] == confusion_matrix(y, pred, labels=range(4))).all()
    pr, rc, f1, sup = precision_recall_fscore_support(y, pred, labels=range(4), zero_division=0)
    assert np.allclose(m["per_class"]["precision"], pr) and np.allclose(m["per_class"]["recall"], rc)
    assert np.allclose(m["per_class"]["f1"], f1) and (m["per_class"]["support"] == sup).all()


def test_wilson_interval_matches_scipy():
    from scipy.stats import binomtest

    for k, n in [(90, 100), (3, 7), (10, 10), (0, 25), (147, 153)]:
        ref = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        lo, hi = wilson_interval(k, n)
        assert abs(lo - ref.low) < 1e-6 and abs(hi - ref.high) < 1e-6
    assert wilson_interval(0, 0) == (0.0, 0.0)


def test_ece_of_perfectly_calibrated_and_overconfident():
    rng = np.random.default_rng(1)
    n = 20000
    conf = rng.uniform(0.5, 1.0, n)
    correct = rng.random(n) < conf  # accuracy equals confidence in every bin
    y = np.zeros(n, int)
    p = np.stack([np.where(correct, conf, 1 - conf), np.where(correct, 1 - conf, conf)], 1)
    assert expected_calibration_error(y, p) < 0.02
    p_over = np.tile([0.99, 0.01], (n, 1))
    y_half = (rng.random(n) < 0.5).astype(int)
    assert abs(expected_calibration_error(y_half, p_over) - 0.49) < 0.02
