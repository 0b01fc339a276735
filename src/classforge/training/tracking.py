"""Experiment tracking: copy a finished run directory into MLflow (`--track mlflow`, `classforge track RUN`).

The run directory stays the record (metrics.csv, summary.json, report); MLflow gets a copy that its UI can
compare: every config key as a param, the per-epoch rows of metrics.csv as step metrics, the summary's test
and validation figures, the report's figures, and the model (model.safetensors + model.json + labels.json,
and model.onnx once exported). The MLflow run id is written to RUN/tracking.json, so logging the same run
again (e.g. after `classforge export`) updates that MLflow run instead of making a second one.

Default store: ``sqlite:///mlflow.db`` in the working directory with artifacts in ``./mlruns`` beside it
(MLflow 3's default; its plain ``file:`` store is in maintenance mode). ``--track-uri`` takes any tracking
URI: another SQLite file, ``http://host:5000`` for a tracking server, or ``file:...`` (set
MLFLOW_ALLOW_FILE_STORE=true for that one)."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

from classforge.core.config import load_yaml
from classforge.core.errors import ClassforgeError

TRACKERS = ("mlflow",)
DEFAULT_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "classforge"
EPOCH_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_time_s")
MODEL_FILES = ("model.safetensors", "model.json", "labels.json", "model.onnx")
RUN_FILES = ("summary.json", "config.yaml", "metrics.csv", "predictions.csv", "per_class.csv", "split.csv",
             "report.html")


def check_tracker(name: str) -> None:
    """Fail before training, not after it, on an unknown tracker or a missing package."""
    if name not in TRACKERS:
        raise ClassforgeError(f"--track {name!r}: supported trackers are {', '.join(TRACKERS)}")
    _mlflow()


def _mlflow():
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        import mlflow
    except ImportError:
        raise ClassforgeError("--track mlflow needs MLflow: pip install mlflow (or classforge[track])") from None
    return mlflow


def resolve_uri(uri: str | None) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def _artifact_root(uri: str) -> str | None:
    """Artifacts of a SQLite store go to ./mlruns beside the database file (absolute, so the store works
    from any working directory)."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        return (db.resolve().parent / "mlruns").as_uri()
    return None


def track_run(run_dir: str | Path, tracker: str = "mlflow", uri: str | None = None,
              experiment: str | None = None) -> str:
    """Log RUN_DIR to the tracker; returns the MLflow run id (also written to RUN/tracking.json)."""
    check_tracker(tracker)
    run = Path(run_dir)
    if not (run / "summary.json").is_file():
        raise ClassforgeError(f"{run} has no summary.json: not a finished classforge run")
    uri = resolve_uri(uri)
    try:
        return _log_mlflow(run, uri, experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT)
    except ClassforgeError:
        raise
    except Exception as e:
        raise ClassforgeError(f"Logging {run} to MLflow at {uri} failed ({type(e).__name__}: {e}). The run "
                              f"directory is complete; retry with `classforge track {run} --uri {uri}`") from e


def _log_mlflow(run: Path, uri: str, experiment: str) -> str:
    mlflow = _mlflow()
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment, artifact_location=_artifact_root(uri))
    summary = json.loads((run / "summary.json").read_text())
    config = _read_yaml(run / "config.yaml")
    previous = _previous_run_id(run, uri, client)
    if previous:
        run_id = previous
    else:
        tags = {"mlflow.runName": run.name, "backbone": summary.get("backbone", ""),
                "strategy": summary.get("strategy", ""), "task": summary.get("task", ""),
                "data": summary.get("data", ""), "run_dir": str(run.resolve()), "classforge.format": "classforge-run/1"}
        run_id = client.create_run(exp_id, run_name=run.name, tags=tags).info.run_id
        params = [Param(k, _param_value(v)) for k, v in sorted(_flatten(config).items()) if v not in (None, "", {}, [])]
        params.append(Param("preprocess_ops", _preprocess_of(run)))
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            client.log_batch(run_id, params=params[i:i + 100])
        steps = _epoch_metrics(run / "metrics.csv")
        finals = _final_metrics(summary)
        ts = int(os.path.getmtime(run / "summary.json") * 1000)
        metrics = [Metric(k, v, ts, step) for step, k, v in steps] + [Metric(k, v, ts, 0) for k, v in finals.items()]
        for i in range(0, len(metrics), 1000):  # and at most 1000 metrics
            client.log_batch(run_id, metrics=metrics[i:i + 1000])
        client.log_batch(run_id, tags=[RunTag("classforge.stages", ",".join(_stages(run / "metrics.csv")))])
    for f in sorted(run.glob("*.png")):
        client.log_artifact(run_id, str(f), "figures")
    for name in RUN_FILES:
        if (run / name).is_file():
            client.log_artifact(run_id, str(run / name), "run")
    for name in MODEL_FILES:
        if (run / name).is_file():
            client.log_artifact(run_id, str(run / name), "model")
    client.set_terminated(run_id, "FINISHED")
    (run / "tracking.json").write_text(json.dumps({"mlflow": {"tracking_uri": uri, "experiment_id": exp_id,
                                                              "run_id": run_id}}, indent=2))
    print(f"MLflow: run {run_id} in experiment {experiment!r} at {uri}"
          + (" (updated)" if previous else "") + f" (mlflow {mlflow.__version__})")
    return run_id


def _previous_run_id(run: Path, uri: str, client) -> str | None:
    p = run / "tracking.json"
    if not p.is_file():
        return None
    try:
        info = json.loads(p.read_text())["mlflow"]
        if info["tracking_uri"] != uri:
            return None
        client.get_run(info["run_id"])  # still there?
        return info["run_id"]
    except Exception:  # noqa: BLE001 - a stale or foreign tracking.json means: log a new run
        return None


def _read_yaml(path: Path) -> dict:
    return (load_yaml(path.read_text()) or {}) if path.is_file() else {}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _param_value(v) -> str:
    s = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return s[:6000]  # MLflow's limit for a param value


def _preprocess_of(run: Path) -> str:
    try:
        ops = json.loads((run / "model.json").read_text())["spec"].get("preprocess") or []
    except (OSError, KeyError, ValueError):
        ops = []
    return "+".join(ops) or "none"


def _num(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _stages(path: Path) -> list[str]:
    seen: list[str] = []
    for r in _rows(path):
        if r.get("stage") and r["stage"] not in seen:
            seen.append(r["stage"])
    return seen


def _epoch_metrics(path: Path) -> list[tuple[int, str, float]]:
    """metrics.csv rows -> (step, name, value). Steps count epochs across stages (a two-stage run's head
    epochs, then its fine-tuning epochs), so one MLflow curve shows the whole run."""
    out = []
    for step, r in enumerate(_rows(path)):
        for k in EPOCH_METRICS:
            v = _num(r.get(k))
            if v is not None:
                out.append((step, k, v))
    return out


def _final_metrics(summary: dict) -> dict[str, float]:
    m: dict[str, float] = {}
    for split in ("test", "val"):
        s = summary.get(split) or {}
        for k in ("accuracy", "macro_f1", "ece", "log_loss"):
            if _num(s.get(k)) is not None:
                m[f"{split}_{k}"] = float(s[k])
        if s.get("accuracy_ci95"):
            m[f"{split}_accuracy_ci95_lo"], m[f"{split}_accuracy_ci95_hi"] = map(float, s["accuracy_ci95"])
    for k, v in (summary.get("timing") or {}).items():
        if _num(v) is not None:
            m[f"time_{k}"] = float(v)
    for k, v in (summary.get("params") or {}).items():
        m[f"params_{k}"] = float(v)
    return m
