"""`classforge calibrate RUN`: temperature scaling fitted on the run's validation split, used by every Predictor
of the run (predict, evaluate, the REST server), never changing the predicted class."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import tree_checksums
from typer.testing import CliRunner

from classforge.cli import app
from classforge.evaluation.calibrate import fit_temperature
from classforge.runtime.predictor import Predictor, softmax

runner = CliRunner()


def _flat(result) -> str:
    return " ".join(result.output.split())


def test_fit_temperature_recovers_a_known_over_confidence():
    """Labels drawn from softmax(z) are calibrated for z; shown 3z (over-confident) or z/2 (under-confident),
    the fitted temperature must undo the factor."""
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2.0, (20000, 5))
    p = softmax(z.astype(np.float32)).astype(np.float64)
    y = np.array([rng.choice(5, p=row / row.sum()) for row in p])
    assert fit_temperature(3 * z, y) == pytest.approx(3.0, rel=0.06)
    assert fit_temperature(z / 2, y) == pytest.approx(0.5, rel=0.06)
    assert fit_temperature(z, y) == pytest.approx(1.0, rel=0.06)


@pytest.fixture(scope="module")
def small_run(shapes_dir, tmp_path_factory):
    import classforge

    out = tmp_path_factory.mktemp("calib") / "small"
    return classforge.train(shapes_dir, out, backbone="cnn_small", strategy="scratch", epochs=4, batch_size=16,
                            split="0.5,0.3,0.2", label_smoothing=0.3)


def _val_files(run):
    import csv

    data = json.loads((run / "summary.json").read_text())["data"]
    with open(run / "split.csv") as f:
        return [f"{data}/{r['path']}" for r in csv.DictReader(f) if r["split"] == "val"]


def test_calibrate_writes_the_temperature_and_predictors_use_it(small_run, shapes_dir):
    before_data = tree_checksums(shapes_dir)
    files = _val_files(small_run)
    p1 = Predictor.from_run(small_run, backend="torch")
    probs1 = p1.predict_proba(files)
    out = runner.invoke(app, ["calibrate", str(small_run), "--test"], terminal_width=200)
    assert out.exit_code == 0, out.output
    res = json.loads((small_run / "calibration.json").read_text())
    t = res["temperature"]
    assert json.loads((small_run / "model.json").read_text())["temperature"] == t
    assert res["fitted_on"] == "val" and res["val"]["calibrated"]["n"] == len(files)
    # The fit lowers the validation NLL (it is the minimiser; T=1 is one of the candidates) and keeps accuracy.
    assert res["val"]["calibrated"]["nll"] <= res["val"]["uncalibrated"]["nll"]
    for sp in ("val", "test"):
        assert res[sp]["calibrated"]["accuracy"] == res[sp]["uncalibrated"]["accuracy"]
    assert t != pytest.approx(1.0, abs=1e-3)  # label smoothing 0.3 leaves this net under-confident
    p2 = Predictor.from_run(small_run, backend="torch")
    assert p2.temperature == pytest.approx(t)
    probs2 = p2.predict_proba(files)
    logits = np.log(np.clip(probs1, 1e-30, None))  # softmax is shift-invariant: log-probs stand in for logits
    np.testing.assert_allclose(probs2, softmax((logits / t).astype(np.float32)), atol=1e-5)
    assert (probs2.argmax(1) == probs1.argmax(1)).all()
    assert tree_checksums(shapes_dir) == before_data


def test_server_uses_the_temperature(small_run):
    from conftest import ServerThread

    requests = pytest.importorskip("requests")
    from classforge.serve.api import create_app

    runner.invoke(app, ["calibrate", str(small_run), "--temperature", "0.25"])
    f = _val_files(small_run)[0]
    expected = Predictor.from_run(small_run, backend="torch").predict([f], top_k=3)[0]
    with ServerThread(create_app(small_run, ui=False, backend="torch")) as srv:
        r = requests.post(srv.url + "/predict?top_k=3", files={"file": ("x.png", Path(f).read_bytes())}, timeout=30)
    assert r.status_code == 200, r.text
    got = r.json()["results"][0]
    assert got["label"] == expected["label"]
    assert got["probability"] == pytest.approx(expected["probability"], abs=1e-4)
    res = json.loads((small_run / "calibration.json").read_text())
    assert res["fitted_on"] == "given" and res["temperature"] == 0.25
    out = runner.invoke(app, ["calibrate", str(small_run), "--temperature", "1"])
    assert out.exit_code == 0 and Predictor.from_run(small_run, backend="torch").temperature == 1.0


def test_calibrate_errors_are_messages(small_run, tmp_path):
    out = runner.invoke(app, ["calibrate", str(tmp_path)])
    assert out.exit_code != 0 and "not a classforge run directory" in _flat(out)
    out = runner.invoke(app, ["calibrate", str(small_run), "--temperature", "0"])
    assert out.exit_code != 0 and "--temperature must be between" in _flat(out)
    out = runner.invoke(app, ["calibrate", str(small_run), "--data", str(tmp_path / "gone")])
    assert out.exit_code != 0 and "not found" in _flat(out) and "Traceback" not in out.output


def test_model_card_states_the_temperature(small_run):
    from classforge.deploy.modelcard import write_model_card

    write_model_card(small_run, license="mit")
    out = runner.invoke(app, ["calibrate", str(small_run), "--temperature", "0.5"])
    assert out.exit_code == 0, out.output
    card = (small_run / "README.md").read_text()
    assert "temperature T = 0.5" in card and "license: mit" in card  # refreshed, license kept
    runner.invoke(app, ["calibrate", str(small_run), "--temperature", "1"])
    assert "temperature T =" not in (small_run / "README.md").read_text()
