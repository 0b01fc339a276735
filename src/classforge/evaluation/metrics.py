"""Metrics as pure functions of (y_true, probabilities). Checked against scikit-learn in the tests."""

from __future__ import annotations

import math

import numpy as np


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a proportion k/n (better than the normal one near 0 or 1)."""
    if n == 0:
        return (0.0, 0.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(C, C) counts, rows = true class, columns = predicted class."""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def per_class(cm: np.ndarray) -> dict[str, np.ndarray]:
    tp = np.diag(cm).astype(float)
    support = cm.sum(axis=1).astype(float)
    predicted = cm.sum(axis=0).astype(float)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=(precision + recall) > 0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support.astype(int)}


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> float:
    """ECE: |accuracy - confidence| averaged over equal-width confidence bins, weighted by bin size."""
    if len(y_true) == 0:
        return 0.0
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    edges = np.linspace(0, 1, n_bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi) if lo > 0 else (conf >= lo) & (conf <= hi)
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def summarize(y_true: np.ndarray, probs: np.ndarray, n_classes: int) -> dict:
    """The numbers summary.json and the report carry for one split."""
    y_true = np.asarray(y_true, dtype=int)
    n = len(y_true)
    y_pred = probs.argmax(axis=1) if n else np.zeros(0, int)
    k = int((y_pred == y_true).sum())
    cm = confusion(y_true, y_pred, n_classes)
    pc = per_class(cm)
    present = pc["support"] > 0  # macro F1 over classes present in this split (as sklearn with labels=present)
    loss = float(-np.log(np.clip(probs[np.arange(n), y_true], 1e-12, 1)).mean()) if n else 0.0
    return {
        "n": n,
        "accuracy": k / n if n else 0.0,
        "accuracy_ci95": list(wilson_interval(k, n)),
        "macro_f1": float(pc["f1"][present].mean()) if present.any() else 0.0,
        "ece": expected_calibration_error(y_true, probs),
        "log_loss": loss,
        "confusion": cm,
        "per_class": pc,
    }


def run_warnings(summary: dict, test_labels: np.ndarray) -> list[str]:
    """What a reader must know before trusting the numbers: a test split whose class shares differ from the
    data's, training that stopped inside its first epoch, and a test accuracy that chance (always answering the
    most frequent test class) would reach within its interval."""
    out = list((summary.get("split") or {}).get("warnings", []))
    trainer = summary.get("trainer") or {}
    if trainer and trainer.get("epochs_run", 1) < 1:
        out.append(f"training stopped before one full epoch (by {trainer.get('stopped_by', 'its limit')}): "
                   "the model has seen only part of the data once; give a longer --time-budget or fewer files")
    if len(test_labels):
        chance = float(np.bincount(test_labels).max() / len(test_labels))
        lo, hi = summary["test"]["accuracy_ci95"]
        if lo <= chance:
            out.append(f"test accuracy {summary['test']['accuracy']:.3f} (95% CI {lo:.3f}-{hi:.3f}) is within "
                       f"reach of chance ({chance:.3f}: always answering the most frequent class)")
    return out


def bin_order(labels: list[str]) -> list[int] | None:
    """Each label's rank among ordered bins ('0-3', '3-10', '10+' as --bins names them), or None when the
    labels are not such bins."""
    lows = []
    for lab in labels:
        try:
            lows.append(float(lab.split("-")[0].rstrip("+")) if not lab.startswith("-") else float("nan"))
        except ValueError:
            return None
    if any(low != low for low in lows) or len(set(lows)) != len(lows):
        return None
    order = sorted(range(len(labels)), key=lambda i: lows[i])
    rank = [0] * len(labels)
    for r, i in enumerate(order):
        rank[i] = r
    return rank


def ordinal_metrics(labels: list[str], y: np.ndarray, probs: np.ndarray) -> dict | None:
    """For ordered bins (ages, sizes): how often the prediction is the right bin or a neighbour, and the mean
    distance in bins. Exact accuracy alone counts 20-30 for 30-40 as wrong as 0-10."""
    rank = bin_order(labels)
    if rank is None or not len(y):
        return None
    r = np.asarray(rank)
    dist = np.abs(r[np.asarray(probs).argmax(1)] - r[np.asarray(y)])
    return {"within_one_bin": float((dist <= 1).mean()), "mean_abs_bin_error": float(dist.mean())}
