"""Progress that stays readable: a summary line per phase that remains after the bar, and no bar in logs."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import make_image_folder

from classforge.core.progress import progress, summary_line


def test_every_phase_leaves_one_summary_line_and_no_carriage_returns_in_logs(capsys, monkeypatch):
    monkeypatch.delenv("CLASSFORGE_QUIET", raising=False)
    assert list(progress(range(3), total=3, desc="Checking files")) == [0, 1, 2]  # even under 50 files
    bar = progress(range(120), total=120, desc="Embedding train")
    bar.update(100)
    bar.update(20)
    bar.close()
    bar.close()  # once only
    err = capsys.readouterr().err
    assert "\r" not in err  # stderr is not a terminal here: no live bar
    lines = err.strip().splitlines()
    assert lines[0].startswith("Checking files: 3 files in ") and lines[1].startswith("Embedding train: 120 files in ")
    assert len(lines) == 2
    assert summary_line("Decoding", 1, "file", 0.5) == "Decoding: 1 file in 0.5 s"
    assert summary_line("Decoding", 1000, "file", 2.0) == "Decoding: 1,000 files in 2.0 s (500 files/s)"


def test_training_says_each_epoch_with_its_real_count(tmp_path):
    root = make_image_folder(tmp_path / "d", 10, kinds=("circle", "stripes"))
    out = subprocess.run([sys.executable, "-m", "classforge.cli", "train", str(root), "--out", str(tmp_path / "r"),
                          "--backbone", "cnn_small", "--strategy", "scratch", "--epochs", "2"],
                         capture_output=True, text=True, timeout=600,
                         env={k: v for k, v in os.environ.items() if k != "CLASSFORGE_QUIET"})
    assert out.returncode == 0, out.stderr[-2000:]
    epochs = [ln.strip() for ln in out.stderr.splitlines() if ln.strip().startswith("epoch ")]
    assert [e.split(",")[0] for e in epochs] == ["epoch 1/2", "epoch 2/2"] and "val acc" in epochs[0]
    assert "v_num" not in out.stderr and "\r" not in out.stderr
    assert "Checking files: 20 files in" in out.stderr
