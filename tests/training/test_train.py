"""End to end on generated images: the run directory contract, predict parity, strategies, bad data."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import bad_image_folder, make_image_folder, tree_checksums

import classforge
from classforge.core.errors import ClassforgeError
from classforge.data.rundata import run_files
from classforge.training.checkpoints import checkpoint_dir

RUN_FILES = ["config.yaml", "labels.json", "split.csv", "model.safetensors", "model.json", "metrics.csv",
             "summary.json", "predictions.csv", "per_class.csv", "confusion_matrix.png", "curves.png", "report.html"]


def read_csv(p: Path) -> list[dict]:
    with open(p) as f:
        return list(csv.DictReader(f))


def test_linear_run_directory_contract(linear_run):
    for f in RUN_FILES:
        assert (linear_run / f).is_file(), f
    s = json.loads((linear_run / "summary.json").read_text())
    assert s["task"] == "image" and s["backbone"] == "efficientnet_lite0" and s["strategy"] == "linear"
    assert s["classes"] == 3
    t = s["test"]
    assert t["n"] > 0 and 0 <= t["accuracy_ci95"][0] <= t["accuracy"] <= t["accuracy_ci95"][1] <= 1
    assert t["accuracy"] >= 0.9  # three visually obvious classes
    for k in ("macro_f1", "ece"):
        assert k in t and k in s["val"]
    assert s["params"]["total"] > 3_000_000 and s["timing"]["embedding_s"] > 0
    counts = s["split"]["counts"]
    scored_from_features = counts["test"] if s["embeddings"].get("scoring_engine") else 0  # test embedded too
    assert s["embeddings"]["computed"] + s["embeddings"]["cached"] == counts["train"] + counts["val"] + scored_from_features
    rows = read_csv(linear_run / "metrics.csv")
    assert len(rows) >= 2 and rows[0]["stage"] == "head" and rows[0]["train_loss"]
    html = (linear_run / "report.html").read_text()
    for section in ("Confusion matrix", "Per-class metrics", "Worst mistakes", "Skipped files", "Training curves"):
        assert section in html


def test_predictions_csv_matches_predict_api(linear_run):
    """The Predictor behind `predict` gives the probabilities the evaluation wrote."""
    rows = read_csv(linear_run / "predictions.csv")
    data_root = Path(json.loads((linear_run / "summary.json").read_text())["data"])
    paths = [str(data_root / r["path"]) for r in rows[:6]]
    res = classforge.load(linear_run).predict(paths, top_k=3)
    for r, p in zip(rows, res):
        assert p["label"] == r["predicted"]
        assert abs(p["probability"] - float(r["probability"])) < 1e-4
        assert len(p["top_k"]) == 3 and p["top_k"][0]["label"] == p["label"]


def test_predict_cli_json_and_bad_file(linear_run, shapes_dir, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    img = next((shapes_dir / "circle").glob("*.png"))
    out = subprocess.run([sys.executable, "-m", "classforge.cli", "predict", str(linear_run), str(img), str(bad),
                          "--json", "--top-k", "2"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 1  # one file failed
    res = json.loads(out.stdout)
    assert res[0]["label"] == "circle" and len(res[0]["top_k"]) == 2
    assert "not an image" in res[1]["error"]
    assert "Traceback" not in out.stderr


def test_second_run_reuses_embedding_cache(linear_run, shapes_dir, tmp_path):
    run2 = classforge.train(shapes_dir, tmp_path / "again", epochs=5)
    s = json.loads((run2 / "summary.json").read_text())
    assert s["embeddings"]["computed"] == 0 and s["embeddings"]["cached"] > 0


@pytest.mark.trains
def test_a_linear_run_embeds_the_images_its_check_decoded_and_frees_them(shapes_dir, tmp_path, monkeypatch):
    """Nothing cached, and the run computes the features itself (not its check process: runtime.ahead): the check
    decodes every file once, the embedding pass takes each file's image from what the check kept instead of
    decoding it again, and the run lets go of whatever it kept."""
    from classforge.data import image, kept
    from classforge.training import prepared

    made = []

    class Recording(kept.KeptImages):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.cleared = False
            made.append(self)

        def clear(self):
            self.cleared = True
            super().clear()

    decodes = []
    real = image.open_image
    monkeypatch.setattr(prepared, "KeptImages", Recording)
    monkeypatch.setattr(image, "open_image", lambda src, *a, **k: (decodes.append(src), real(src, *a, **k))[1])
    monkeypatch.setenv("CLASSFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CLASSFORGE_NO_AHEAD", "1")
    run = classforge.train(shapes_dir, tmp_path / "once", backbone="efficientnet_lite0", strategy="linear",
                           epochs=3)
    n = len(read_csv(run / "split.csv"))
    assert len(made) == 1 and made[0].stats["kept"] == n and made[0].stats["taken"] == n
    assert len(made[0]) == 0 and made[0].used == 0 and made[0].cleared  # released, whatever was left
    assert len(decodes) < n / 2  # only the scoring check's few files are decoded after the check


def test_splits_that_share_an_engine_and_views_are_embedded_in_one_pass():
    from classforge.runtime.engines import Engine
    from classforge.training.flow import extraction_passes

    fast, exact = Engine("onnx"), Engine("torch")
    assert [p[0] for p in extraction_passes({"train": fast, "val": fast, "test": fast}, 1)] == [["train", "val",
                                                                                                "test"]]
    passes = extraction_passes({"train": fast, "val": fast, "test": fast}, 4)  # augmented views of train only
    assert [(p[0], p[2]) for p in passes] == [(["train"], 4), (["val", "test"], 1)]
    passes = extraction_passes({"train": fast, "val": exact, "test": exact}, 1)
    assert [(p[0], p[1]) for p in passes] == [(["train"], fast), (["val", "test"], exact)]


def test_run_loads_without_training_code(linear_run):
    """A run needs only safetensors + JSON: load it and predict in a fresh interpreter that blocks lightning and
    every way to unpickle (pickle.load/loads, torch.load)."""
    files = [str(f) for f, _, _ in run_files(linear_run, ("test",))][:2]
    code = ("import sys, pickle, torch; sys.modules['lightning'] = None; sys.modules['pytorch_lightning'] = None\n"
            "def refuse(*a, **k): raise AssertionError('unpickling attempted')\n"
            "pickle.load = pickle.loads = torch.load = refuse; pickle.Unpickler = refuse\n"
            "import classforge\n"
            f"p = classforge.load({str(linear_run)!r}, backend='torch')\n"
            f"p.predict({files!r})\n"
            "print(len(p.labels))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "3"


def test_evaluate_rescores_on_another_folder(linear_run, tmp_path):
    other = make_image_folder(tmp_path / "other", 6, seed=42)
    res = classforge.evaluate(linear_run, str(other), out=str(tmp_path / "ev"))
    assert res["test"]["n"] == 18 and res["test"]["accuracy"] >= 0.8
    assert (tmp_path / "ev" / "report.html").is_file() and (tmp_path / "ev" / "predictions.csv").is_file()


def test_bad_files_train_fine_and_are_reported(tmp_path, capsys):
    root = bad_image_folder(tmp_path / "bad")
    before = tree_checksums(root)
    run = classforge.train(root, tmp_path / "run", epochs=3)
    said = capsys.readouterr().out
    assert "5 file(s) skipped" in said and str(run / "report.html") in said  # the console summary says so
    html = (run / "report.html").read_text()
    for name in ("truncated.jpg", "empty.png", "notes.jpg", "tiny.png", "bomb.png"):
        assert name in html
    s = json.loads((run / "summary.json").read_text())
    assert s["skipped"] == 5
    assert tree_checksums(root) == before


def test_finetune_small_cnn_with_time_budget_and_resume(tmp_path):
    root = make_image_folder(tmp_path / "d", 16, kinds=("circle", "stripes"))
    t0 = time.time()
    # epochs far beyond what 8 s allow on any machine (an idle 2-core CPU ran 200 epochs of this in 8 s)
    run = classforge.train(root, tmp_path / "ft", backbone="cnn_small", strategy="scratch", epochs=100_000,
                           time_budget="8s", batch_size=16, patience=1_000_000, keep_checkpoints=True)
    assert time.time() - t0 < 120
    rows = read_csv(run / "metrics.csv")
    assert rows[0]["epoch"] == "0" and rows[0]["val_acc"]  # evaluation before the first epoch
    assert 1 <= len(rows) - 1 < 100_000  # stopped by the budget, not by the epoch count
    assert json.loads((run / "summary.json").read_text())["trainer"]["stopped_by"] == "time budget"
    # the run folder holds no pickle: the checkpoints --resume needs are in the cache (kept, as asked)
    assert not list(run.rglob("*.ckpt")) and not (run / "lightning_logs").exists()
    assert (checkpoint_dir(run) / "last.ckpt").is_file()
    run2 = classforge.train(root, tmp_path / "ft", backbone="cnn_small", strategy="scratch",
                            epochs=len(rows) + 1, batch_size=16, resume=True, patience=1_000_000,
                            keep_checkpoints=True)
    rows2 = read_csv(run2 / "metrics.csv")
    # continued, not restarted, and the history before the stop is kept: epochs 0..N-1, then N and N+1
    assert [r["epoch"] for r in rows2] == [str(e) for e in range(len(rows) + 2)]
    assert rows2[: len(rows)] == rows or [r["val_loss"] for r in rows2[: len(rows)]] == [r["val_loss"] for r in rows]
    # a checkpoint cut short (a crash while it was written) is a clear error, not a traceback
    ckpt = checkpoint_dir(run) / "last.ckpt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(ClassforgeError, match="unreadable.*start again without --resume"):
        classforge.train(root, tmp_path / "ft", backbone="cnn_small", strategy="scratch", epochs=len(rows) + 2,
                         batch_size=16, resume=True)


def test_resume_after_kill_keeps_every_epoch(tmp_path):
    """kill -9 in the middle of training, then --resume: metrics.csv has every epoch, before and after."""
    import signal

    root = make_image_folder(tmp_path / "d", 16, kinds=("circle", "stripes"))
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "classforge.cli", "train", str(root), "--out", str(out), "--backbone", "cnn_small",
           "--strategy", "scratch", "--epochs", "100000", "--batch-size", "16", "--patience", "1000000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "CLASSFORGE_QUIET": "1"})
    journal = checkpoint_dir(out) / "history.jsonl"
    t0 = time.time()
    try:
        while time.time() - t0 < 300:
            lines = journal.read_text().splitlines() if journal.exists() else []
            if len(lines) >= 4 and (checkpoint_dir(out) / "last.ckpt").exists():
                break
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = [json.loads(x)["epoch"] for x in journal.read_text().splitlines()]
    run = classforge.train(root, out, backbone="cnn_small", strategy="scratch", epochs=max(done) + 2,
                           batch_size=16, resume=True, patience=1_000_000)
    epochs = [int(r["epoch"]) for r in read_csv(run / "metrics.csv")]
    assert epochs == list(range(max(done) + 3)), epochs  # 0 (before training) .. the last, no gap
    # it succeeded: its checkpoints are gone from the cache, and none was ever in the run folder
    assert not checkpoint_dir(run).exists() and not list(run.rglob("*.ckpt"))


def test_two_stage_on_lite0(tmp_path):
    root = make_image_folder(tmp_path / "d", 12, kinds=("circle", "stripes"))
    run = classforge.train(root, tmp_path / "ts", strategy="two-stage", epochs=1, batch_size=8)
    stages = {r["stage"] for r in read_csv(run / "metrics.csv")}
    assert stages == {"head", "two-stage"}
    # a finished fine-tune leaves no pickle in its folder, and its checkpoints are gone from the cache
    assert not list(run.rglob("*.ckpt")) and not (run / "lightning_logs").exists()
    assert not checkpoint_dir(run).exists()
    s = json.loads((run / "summary.json").read_text())
    assert s["test"]["accuracy"] >= 0.75 and s["params"]["trainable"] == s["params"]["total"]


def test_ddp_two_cpu_processes_finetune(tmp_path):
    """Data-parallel fine-tuning over gloo with 2 CPU processes gives an ordinary run directory."""
    root = make_image_folder(tmp_path / "d", 12, kinds=("circle", "stripes"))
    env = {**os.environ, "CLASSFORGE_QUIET": "1"}
    cmd = [sys.executable, "-m", "classforge.cli", "train", str(root), "--out", str(tmp_path / "ddp"),
           "--backbone", "cnn_small", "--strategy", "finetune", "--epochs", "2", "--batch-size", "8",
           "--accelerator", "cpu", "--devices", "2", "--dist-strategy", "ddp"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    for f in RUN_FILES:
        assert (tmp_path / "ddp" / f).is_file(), f
    s = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert s["trainer"]["world_size"] == 2 and s["trainer"]["strategy"] == "DDPStrategy"


def test_clear_errors_without_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "classforge.cli", "train", str(tmp_path / "missing")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Data not found" in out.stdout and "Traceback" not in out.stderr
    with pytest.raises(ClassforgeError, match="Did you mean 'epochs'"):
        classforge.train(tmp_path, epoch=3)


def test_lr_finder_and_class_rebalancing(tmp_path):
    root = make_image_folder(tmp_path / "d", 20, kinds=("circle", "stripes"))
    for p in sorted((root / "stripes").glob("*.png"))[6:]:
        p.unlink()  # imbalance: 20 circles, 6 stripes
    run = classforge.train(root, tmp_path / "lr", backbone="cnn_small", strategy="scratch", epochs=2, lr="auto",
                           batch_size=8, balance="oversample")
    assert (run / "lr_finder.png").is_file()
    s = json.loads((run / "summary.json").read_text())
    assert s["trainer"]["lr"] != 2e-3  # the finder's suggestion replaced the default
    run2 = classforge.train(root, tmp_path / "w", epochs=5, balance="weights")
    assert json.loads((run2 / "summary.json").read_text())["test"]["n"] > 0


def test_auto_strategy_trains_weightless_backbones_from_scratch(tmp_path):
    root = make_image_folder(tmp_path / "d", 10, kinds=("circle", "stripes"))
    run = classforge.train(root, tmp_path / "auto", backbone="cnn_small", epochs=1, batch_size=8)
    s = json.loads((run / "summary.json").read_text())
    assert s["strategy"] == "scratch" and s["params"]["trainable"] == s["params"]["total"]
    assert read_csv(run / "metrics.csv")[0]["epoch"] == "0"  # the pre-training evaluation of a real fit


def test_file_names_that_are_not_utf8_train_and_round_trip(tmp_path):
    """Linux file names may hold any bytes: such a file trains like the others, and split.csv and
    predictions.csv give back a path that opens it."""
    import csv
    import os

    root = make_image_folder(tmp_path / "d", 12, kinds=("circle", "stripes"))
    odd = root / "circle" / os.fsdecode(b"\xff\xfe-photo.png")
    (root / "circle" / "circle_000.png").rename(odd)
    run = classforge.train(root, tmp_path / "run", backbone="cnn_small", strategy="scratch", epochs=1,
                           split="0.5,0.25,0.25")
    with open(run / "split.csv", newline="", encoding="utf-8", errors="surrogateescape") as f:
        rows = {r["path"]: r for r in csv.DictReader(f)}
    rel = odd.relative_to(root).as_posix()
    assert rel in rows and (root / rel).is_file()
    assert (run / "report.html").is_file()
    from classforge.data.discover import discover
    from classforge.data.split import read_split

    ds = discover(root)
    report = read_split(run / "split.csv", ds.samples)
    assert next(s for s in ds.samples if s.rel == rel).split == rows[rel]["split"] and not report.excluded


def test_failed_runs_leave_no_half_made_folder(tmp_path, shapes_dir):
    """Missing data, a folder without classes, a misspelt backbone (before any file is read) and an error after
    the run folder was made: no run folder stays behind, and a folder the user made is never deleted."""
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [(tmp_path / "missing", {}, "Data not found"), (empty, {}, ""),
             (shapes_dir, {"backbone": "resnet999"}, "Unknown backbone 'resnet999'"),
             (shapes_dir, {"backbone": "cnn_small", "strategy": "scratch", "schedule": "weekly"}, "--schedule")]
    for i, (data, options, message) in enumerate(cases):
        out = tmp_path / f"run{i}"
        with pytest.raises(ClassforgeError, match=message):
            classforge.train(data, out, **options)
        assert not out.exists(), (data, options)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ClassforgeError):
        classforge.train(shapes_dir, mine, backbone="cnn_small", strategy="scratch", schedule="weekly")
    assert (mine / "notes.txt").read_text() == "keep me"
