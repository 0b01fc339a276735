"""benchmarks/cifar10/tta.py (`python benchmarks/cifar10/tta.py tta RUN`): score each test-time augmentation mode on the run's validation split, keep the best, and
make predict / export / serve use it (model.onnx re-exported)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import typer
from conftest import tree_checksums
from typer.testing import CliRunner

from classforge.core.errors import ClassforgeError

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "cifar10"))
import tta as tta_script  # noqa: E402 - benchmarks/cifar10/tta.py

runner = CliRunner()
app = typer.Typer()
tta_script.add_commands(app)


@app.callback()
def _root() -> None:
    pass


def _flat(result) -> str:
    """The command's output on one line (rich wraps long messages at the console width)."""
    return " ".join(result.output.split())


@pytest.fixture(scope="module")
def cnn_run(shapes_dir, tmp_path_factory):
    import classforge

    out = tmp_path_factory.mktemp("tta") / "fast"
    return classforge.train(shapes_dir, out, backbone="cnn_fast_256k", strategy="scratch", epochs=3,
                            batch_size=16, split="0.5,0.3,0.2", backbone_args={"tta": "flip"})


def _accuracy(run, split: str, mode: str) -> tuple[float, int]:
    """Accuracy of the run's model with `mode` on its `split` files, computed here independently."""
    import csv

    from classforge.runtime.predictor import Predictor

    p = Predictor.from_run(run, backend="torch")
    p.model.backbone.tta = mode
    data = json.loads((run / "summary.json").read_text())["data"]
    with open(run / "split.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == split]
    probs = p.predict_proba([f"{data}/{r['path']}" for r in rows])
    y = np.array([p.labels.index(r["label"]) for r in rows])
    return float((probs.argmax(1) == y).mean()), len(rows)


def test_auto_chooses_on_validation_and_predict_uses_it(cnn_run, shapes_dir):
    before = tree_checksums(shapes_dir)
    out = runner.invoke(app, ["tta", str(cnn_run), "--test"], terminal_width=200)
    assert out.exit_code == 0, out.output
    res = json.loads((cnn_run / "tta.json").read_text())
    assert set(res["modes"]) == {"none", "flip", "flip-shift", "flip-shift8", "flip-shift24"}
    for mode, v in res["modes"].items():  # the figures are the model's accuracy with that mode on that split
        acc, n = _accuracy(cnn_run, "val", mode)
        assert v["val"]["n"] == n and v["val"]["accuracy"] == pytest.approx(acc, abs=1e-4), mode
    acc, n = _accuracy(cnn_run, "test", res["chosen"])
    chosen_test = res["modes"][res["chosen"]]["test"]
    assert chosen_test["n"] == n and chosen_test["accuracy"] == pytest.approx(acc, abs=1e-4)
    vals = [v["val"]["accuracy"] for v in res["modes"].values()]
    modes = list(res["modes"])
    assert res["chosen"] == modes[vals.index(max(vals))]  # best on val; a tie goes to the cheaper mode
    assert res["chosen_on"] == "val" and res["before"] == "flip"
    meta = json.loads((cnn_run / "model.json").read_text())
    assert meta["backbone_kwargs"]["tta"] == res["chosen"]
    from classforge.runtime.predictor import Predictor

    assert Predictor.from_run(cnn_run, backend="torch").model.backbone.tta == res["chosen"]
    assert tree_checksums(shapes_dir) == before  # the data folder is read-only


def test_given_mode_reexports_onnx(cnn_run):
    from classforge.deploy.onnx import export_run
    from classforge.runtime.predictor import Predictor

    runner.invoke(app, ["tta", str(cnn_run), "--mode", "none"])
    export_run(cnn_run, n_parity=8, model_card=False, quantize="int8-dynamic")
    int8_before = (cnn_run / "model.int8.onnx").read_bytes()
    data = json.loads((cnn_run / "summary.json").read_text())["data"]
    files = sorted(str(p) for p in Path(data).rglob("*.png"))[:12]
    p_none = Predictor.from_run(cnn_run, backend="onnx").predict_proba(files)

    out = runner.invoke(app, ["tta", str(cnn_run), "--mode", "flip-shift8"], terminal_width=200)
    assert out.exit_code == 0, out.output
    assert "re-exported model.onnx" in out.output
    res = json.loads((cnn_run / "tta.json").read_text())
    assert res["chosen"] == "flip-shift8" and res["chosen_on"] == "given" and "modes" not in res
    assert res["reexported"] == ["model.onnx", "model.int8.onnx"]  # the int8 file follows, with its method
    assert json.loads((cnn_run / "export.json").read_text())["int8"]["method"].startswith("dynamic")
    assert (cnn_run / "model.int8.onnx").read_bytes() != int8_before
    onnx = Predictor.from_run(cnn_run, backend="onnx").predict_proba(files)
    torch_ = Predictor.from_run(cnn_run, backend="torch")
    assert torch_.model.backbone.tta == "flip-shift8"
    ref = torch_.predict_proba(files)
    np.testing.assert_allclose(onnx, ref, atol=1e-4)  # the exported graph has the 18 views now
    assert not np.allclose(onnx, p_none, atol=1e-4)  # and differs from the single-view model
    assert "Test-time augmentation `flip-shift8` is inside the network" in (cnn_run / "README.md").read_text()


def test_errors_are_messages(cnn_run, linear_run, tmp_path):
    out = runner.invoke(app, ["tta", str(cnn_run), "--mode", "crops"])
    assert out.exit_code != 0 and "must be auto or one of" in _flat(out)
    out = runner.invoke(app, ["tta", str(linear_run)])
    assert out.exit_code != 0 and "no test-time augmentation modes" in _flat(out)
    assert "Traceback" not in _flat(out)
    out = runner.invoke(app, ["tta", str(cnn_run), "--data", str(tmp_path / "gone")])
    assert out.exit_code != 0 and "not found" in _flat(out)
    out = runner.invoke(app, ["tta", str(tmp_path)])
    assert out.exit_code != 0 and "not a classforge run directory" in _flat(out)


def test_score_modes_scores_only_the_modes_asked_and_refuses_unknown_ones(cnn_run):
    from tta import score_modes

    res = score_modes(cnn_run, ("val",), modes=("none", "flip-shift24"))
    assert list(res["modes"]) == ["none", "flip-shift24"]
    acc, n = _accuracy(cnn_run, "val", "flip-shift24")
    got = res["modes"]["flip-shift24"]["val"]
    assert got["n"] == n and got["accuracy"] == pytest.approx(acc, abs=1e-4)
    with pytest.raises(ClassforgeError, match="unknown test-time augmentation mode.*crops"):
        score_modes(cnn_run, ("val",), modes=("flip", "crops"))
