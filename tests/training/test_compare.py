"""classforge compare: one split for every combination, failures reported, the leaderboard's figures."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from classforge.core.config import TrainConfig
from classforge.core.errors import ClassforgeError
from classforge.training.compare import compare, mcnemar_p, plan


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _split_rows(path: Path) -> set[tuple]:
    return {(r["path"], r["label"], r["split"]) for r in _rows(path)}


def test_plan_maps_from_scratch_backbones_to_scratch_once():
    base = TrainConfig()
    combos = plan(["efficientnet_lite0", "cnn_small"], ["linear", "two-stage"], ["none", "gamma=0.8"], base)
    names = [c.name for c in combos]
    assert names == ["efficientnet_lite0-linear", "efficientnet_lite0-linear-gamma=0.8", "efficientnet_lite0-two-stage",
                     "efficientnet_lite0-two-stage-gamma=0.8", "cnn_small-scratch", "cnn_small-scratch-gamma=0.8"]
    cnn = combos[4]
    assert cnn.requested == ["linear", "two-stage"] and "from scratch" in cnn.note
    literal = plan(["cnn_small"], ["linear", "two-stage"], ["none"], base, literal=True)
    assert [c.name for c in literal] == ["cnn_small-linear", "cnn_small-two-stage"]
    assert [c.strategy for c in plan(["efficientnet_lite0"], ["linear"], [], base.replace(pretrained=False))] == ["scratch"]
    with pytest.raises(ClassforgeError, match="not one of"):
        plan(["cnn_small"], ["linaer"], [], base)
    with pytest.raises(ClassforgeError, match="Unknown preprocessing op"):
        plan(["cnn_small"], ["linear"], ["sharpen"], base)


def test_mcnemar_exact(tmp_path):
    def preds(name, correct):
        d = tmp_path / name
        d.mkdir()
        with open(d / "predictions.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "true", "predicted", "probability", "correct", "top_k"])
            for i, c in enumerate(correct):
                w.writerow([f"f{i}.png", "a", "a", "0.9", int(c), ""])
        return d

    a = preds("a", [1] * 10 + [1] * 5 + [0] * 3)
    b = preds("b", [1] * 10 + [0] * 5 + [0] * 3)  # a right where b is wrong on 5 files, never the reverse
    assert mcnemar_p(a, b) == pytest.approx(2 * 0.5 ** 5)
    assert mcnemar_p(a, a) == 1.0


@pytest.fixture(scope="module")
def comparison(shapes_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("compare") / "cmp"
    return compare(str(shapes_dir), ["cnn_small", "no_such_net", "efficientnet_lite0"], ["linear"], ["none"],
                   TrainConfig(epochs=3), out)


def test_every_combination_uses_the_one_split_and_failures_carry_on(comparison):
    rows = {r["name"]: r for r in _rows(comparison / "leaderboard.csv")}
    assert set(rows) == {"cnn_small-scratch", "no_such_net-linear", "efficientnet_lite0-linear"}
    bad = rows["no_such_net-linear"]
    assert bad["status"] == "failed" and "Unknown backbone" in bad["error"] and bad["rank"] == ""
    assert "Traceback" in (comparison / "runs" / "no_such_net-linear" / "error.txt").read_text()
    shared = _split_rows(comparison / "split.csv")
    for name in ("cnn_small-scratch", "efficientnet_lite0-linear"):
        run = Path(rows[name]["run_dir"])
        assert rows[name]["status"] == "ok"
        assert _split_rows(run / "split.csv") == shared
        assert TrainConfig.load(run / "config.yaml").split_file == str((comparison / "split.csv").resolve())
    assert "from scratch" in rows["cnn_small-scratch"]["note"] and rows["cnn_small-scratch"]["requested"] == "linear"


def test_leaderboard_figures(comparison):
    rows = [r for r in _rows(comparison / "leaderboard.csv") if r["status"] == "ok"]
    assert [r["rank"] for r in rows] == ["1", "2"]
    assert float(rows[0]["test_accuracy"]) >= float(rows[1]["test_accuracy"])
    for r in rows:
        s = json.loads((Path(r["run_dir"]) / "summary.json").read_text())
        assert float(r["test_accuracy"]) == pytest.approx(s["test"]["accuracy"])
        assert float(r["ci95_lo"]) <= float(r["test_accuracy"]) <= float(r["ci95_hi"])
        assert float(r["macro_f1"]) == pytest.approx(s["test"]["macro_f1"])
        assert float(r["ece"]) == pytest.approx(s["test"]["ece"])
        assert int(r["params"]) == s["params"]["total"]
        assert int(r["macs"]) > 0 and int(r["ops"]) > int(r["macs"])
        assert 0 < float(r["latency_min_ms"]) <= float(r["latency_ms"])
        assert float(r["train_time_s"]) > 0 and float(r["preprocess_ms"]) > 0
    cnn = next(r for r in rows if r["backbone"] == "cnn_small")
    lite = next(r for r in rows if r["backbone"] == "efficientnet_lite0")
    assert int(lite["macs"]) > 10 * int(cnn["macs"])  # 224 px EfficientNet vs a 32 px CNN
    p = rows[1]["mcnemar_p_vs_best"]
    assert float(p) == pytest.approx(mcnemar_p(Path(rows[0]["run_dir"]), Path(rows[1]["run_dir"])))
    assert (comparison / "accuracy_vs_time.png").stat().st_size > 1000

    md = (comparison / "leaderboard.md").read_text()
    assert md.startswith("| # | model | strategy | preprocess | test acc [95% CI]")
    assert "failed" in md and "Unknown backbone" in md
    assert "- seed: 0" in md and "samples per class (train/val/test): checker" in md
    assert "torch 2." in md and "split.csv sha1" in md and "made once, shared by every run" in md
    page = (comparison / "report.html").read_text()
    assert "<h2>Leaderboard</h2>" in page and "data:image/png;base64" in page and "Data and model card" in page


def test_compare_finished_runs_builds_the_same_table(comparison, tmp_path):
    from typer.testing import CliRunner

    from classforge.cli import app

    first = {r["name"]: r for r in _rows(comparison / "leaderboard.csv") if r["status"] == "ok"}
    runs = [r["run_dir"] for r in first.values()]
    res = CliRunner().invoke(app, ["compare", *runs, "--out", str(tmp_path / "again"), "--no-latency"])
    assert res.exit_code == 0, res.output
    again = {r["name"]: r for r in _rows(tmp_path / "again" / "leaderboard.csv")}
    assert set(again) == set(first)
    for name, r in again.items():
        for k in ("rank", "test_accuracy", "ci95_lo", "ci95_hi", "macro_f1", "ece", "params", "mcnemar_p_vs_best"):
            assert r[k] == first[name][k], k
    assert "WARNING" not in (tmp_path / "again" / "leaderboard.md").read_text()  # they share one split


def test_preprocess_axis_and_reuse_of_finished_runs(shapes_dir, tmp_path, capsys):
    out = tmp_path / "pp"
    args = (str(shapes_dir), ["cnn_small"], ["linear", "two-stage"], ["none", "equalize+gamma=0.8"],
            TrainConfig(epochs=1), out)
    compare(*args, latency=False)
    rows = {r["name"]: r for r in _rows(out / "leaderboard.csv")}
    assert set(rows) == {"cnn_small-scratch", "cnn_small-scratch-equalize+gamma=0.8"}
    assert rows["cnn_small-scratch-equalize+gamma=0.8"]["preprocess"] == "equalize+gamma=0.8"
    meta = json.loads((out / "runs" / "cnn_small-scratch-equalize+gamma=0.8" / "model.json").read_text())
    assert meta["spec"]["preprocess"] == ["equalize", "gamma=0.8"]
    assert rows["cnn_small-scratch"]["requested"] == "linear/two-stage"
    stamp = (out / "runs" / "cnn_small-scratch" / "summary.json").stat().st_mtime
    capsys.readouterr()
    compare(*args, latency=False)  # same configuration: the finished runs are reused, not retrained
    assert "reusing the finished run" in capsys.readouterr().out
    assert (out / "runs" / "cnn_small-scratch" / "summary.json").stat().st_mtime == stamp
