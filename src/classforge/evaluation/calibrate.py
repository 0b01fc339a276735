"""Temperature scaling (Guo et al. 2017): make a trained run's probabilities honest without changing its answers.

`classforge calibrate RUN` computes the run's logits on its own validation split (through the same Predictor that
`predict` and the server use), finds the temperature T that minimises the negative log-likelihood of
softmax(logits / T), and writes it into RUN/model.json. Every Predictor of the run (predict, evaluate, serve, the
web UI) divides the logits by T from then on. Dividing by one positive number never changes which class is on
top, so accuracy is unchanged; only the confidence moves (label smoothing, for example, leaves a net
under-confident: T < 1 sharpens it).
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np

from classforge.core.errors import ClassforgeError
from classforge.evaluation.evaluate import split_samples
from classforge.evaluation.metrics import expected_calibration_error
from classforge.runtime.predictor import Predictor, softmax, update_run_meta

T_RANGE = (0.05, 20.0)


def _nll(logits: np.ndarray, y: np.ndarray, t: float) -> float:
    z = logits / t
    z = z - z.max(1, keepdims=True)
    return float(np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y]))


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The T in T_RANGE with the least NLL: a log-spaced grid, then golden-section search around its best point
    (the NLL is smooth and, as a function of 1/T, convex)."""
    logits = np.asarray(logits, dtype=np.float64)
    grid = np.geomspace(*T_RANGE, 200)
    i = int(np.argmin([_nll(logits, y, t) for t in grid]))
    lo, hi = np.log(grid[max(i - 1, 0)]), np.log(grid[min(i + 1, len(grid) - 1)])
    g = (np.sqrt(5) - 1) / 2
    for _ in range(60):
        a, b = hi - g * (hi - lo), lo + g * (hi - lo)
        if _nll(logits, y, np.exp(a)) < _nll(logits, y, np.exp(b)):
            hi = b
        else:
            lo = a
    return float(np.exp((lo + hi) / 2))


def _scores(logits: np.ndarray, y: np.ndarray, t: float) -> dict:
    p = softmax((logits / t).astype(np.float32))
    return {"nll": round(_nll(logits.astype(np.float64), y, t), 4),
            "ece": round(expected_calibration_error(y, p), 4),
            "accuracy": round(float((p.argmax(1) == y).mean()), 4),
            "mean_confidence": round(float(p.max(1).mean()), 4), "n": len(y)}


def _logits(pred, samples: list, split: str, root: str) -> tuple[np.ndarray, np.ndarray]:
    """(logits, label indices) of `samples` through the run's Predictor (ONNX when exported)."""
    idx = {c: i for i, c in enumerate(pred.labels)}
    sub = [s for s in samples if s.label in idx]
    if not sub:
        raise ClassforgeError(f"the run has no {split} files to calibrate on (split.csv has none, or they are gone "
                              f"from {root}); train with a validation split, e.g. --split 0.8,0.1,0.1")
    logits = pred.predict_logits([s.path for s in sub], batch_size=256, progress_desc=f"Scoring {split}")
    return logits, np.array([idx[s.label] for s in sub])


def calibrate_run(run_dir: str | Path, data: str | None = None, test: bool = False,
                  temperature: float | None = None) -> dict:
    """Fit (or set, with `temperature`) the run's temperature; write it into model.json and RUN/calibration.json."""
    run = Path(run_dir)
    given = temperature is not None
    if given and not (T_RANGE[0] <= temperature <= T_RANGE[1]):
        raise ClassforgeError(f"--temperature must be between {T_RANGE[0]} and {T_RANGE[1]}, got {temperature}")
    pred = Predictor.from_run(run)  # also refuses a directory that is not a run
    res: dict = {"run": str(run), "before": pred.temperature, "fitted_on": "given" if given else "val"}
    splits = ([] if given else ["val"]) + (["test"] if test else [])
    if splits:
        samples, root = split_samples(run, data, tuple(splits))
        res["backend"] = pred.backend
    for sp in splits:  # val first: it fixes the temperature the test split is then scored with
        logits, y = _logits(pred, samples[sp], sp, root)
        if sp == "val":
            temperature = fit_temperature(logits, y)
            if len(y) < 50:
                res["note"] = (f"only {len(y)} validation files: the temperature is uncertain; more validation "
                               "data gives a steadier estimate")
        res[sp] = {"uncalibrated": _scores(logits, y, 1.0), "calibrated": _scores(logits, y, temperature)}
    res["temperature"] = round(float(temperature), 4)
    update_run_meta(run, temperature=res["temperature"])
    res["date"] = dt.datetime.now().isoformat(timespec="seconds")
    (run / "calibration.json").write_text(json.dumps(res, indent=2))
    return res
