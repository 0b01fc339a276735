"""--track mlflow against a real local MLflow store (SQLite + artifact folder), read back with search_runs."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

mlflow = pytest.importorskip("mlflow")

from classforge.core.errors import ClassforgeError


def test_train_with_track_mlflow_logs_params_epoch_metrics_figures_and_model(shapes_dir, tmp_path, monkeypatch):
    import classforge

    monkeypatch.chdir(tmp_path)  # the default store is ./mlflow.db: keep it inside the test's folder
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "classforge-test")
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    run = classforge.train(shapes_dir, tmp_path / "run", backbone="cnn_small", strategy="scratch", epochs=3,
                           preprocess="autocontrast", track="mlflow", track_uri=uri)
    assert os.environ.get("MLFLOW_DISABLE_TELEMETRY") == "true"
    info = json.loads((run / "tracking.json").read_text())["mlflow"]

    mlflow.set_tracking_uri(uri)
    df = mlflow.search_runs(experiment_names=["classforge-test"])
    assert len(df) == 1
    row = df.iloc[0]
    assert row["run_id"] == info["run_id"] and row["status"] == "FINISHED"
    assert row["params.backbone"] == "cnn_small" and row["params.strategy"] == "scratch"
    assert row["params.epochs"] == "3" and row["params.preprocess_ops"] == "autocontrast"
    summary = json.loads((run / "summary.json").read_text())
    assert row["metrics.test_accuracy"] == pytest.approx(summary["test"]["accuracy"])
    assert row["metrics.test_macro_f1"] == pytest.approx(summary["test"]["macro_f1"])
    assert row["metrics.params_total"] == summary["params"]["total"]

    client = mlflow.tracking.MlflowClient(uri)
    with open(run / "metrics.csv") as f:
        epochs = [r for r in csv.DictReader(f) if r["val_loss"]]
    history = client.get_metric_history(info["run_id"], "val_loss")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx([float(r["val_loss"]) for r in epochs])

    names = {a.path for a in client.list_artifacts(info["run_id"], "figures")}
    assert {"figures/confusion_matrix.png", "figures/curves.png"} <= names
    model = {a.path for a in client.list_artifacts(info["run_id"], "model")}
    assert {"model/model.safetensors", "model/model.json", "model/labels.json"} <= model
    local = client.download_artifacts(info["run_id"], "model/model.safetensors", str(tmp_path / "dl"))
    assert Path(local).read_bytes() == (run / "model.safetensors").read_bytes()
    # artifacts of a SQLite store live beside the database, not in the working directory
    assert (tmp_path / "store" / "mlruns").is_dir()

    # After export, `classforge track RUN` adds model.onnx to the same MLflow run.
    (run / "model.onnx").write_bytes(b"onnx stand-in")
    from typer.testing import CliRunner

    from classforge.cli import app

    res = CliRunner().invoke(app, ["track", str(run), "--uri", uri])
    assert res.exit_code == 0, res.output
    assert json.loads((run / "tracking.json").read_text())["mlflow"]["run_id"] == info["run_id"]
    assert "model/model.onnx" in {a.path for a in client.list_artifacts(info["run_id"], "model")}
    assert len(mlflow.search_runs(experiment_names=["classforge-test"])) == 1


def test_unknown_tracker_fails_before_training(shapes_dir, tmp_path):
    import classforge

    with pytest.raises(ClassforgeError, match="supported trackers"):
        classforge.train(shapes_dir, tmp_path / "run", backbone="cnn_small", strategy="scratch", epochs=1,
                         track="wandb")
    assert not (tmp_path / "run").exists()


def test_track_rejects_a_folder_that_is_not_a_run(tmp_path):
    from classforge.training.tracking import track_run

    with pytest.raises(ClassforgeError, match="not a finished classforge run"):
        track_run(tmp_path, "mlflow", f"sqlite:///{tmp_path / 'm.db'}")
