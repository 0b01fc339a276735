"""A run's figures drawn by a second process are the figures this process draws, byte for byte; whatever that
process fails to draw is drawn here; and a run's own process never loads matplotlib."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from classforge.evaluation import figures as fg

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="figures are drawn in-process on Windows")

RNG = np.random.default_rng(0)
PROBS = RNG.dirichlet(np.ones(3), 40)
JOBS = [("confusion", "confusion.png", np.array([[5, 1, 0], [2, 7, 1], [0, 0, 9]]), ["ants", "bees", "wasps"]),
        ("reliability", "reliability.png", RNG.integers(0, 3, 40), PROBS),
        ("curves", "curves.png", [{"epoch": str(e), "train_loss": str(1 / (e + 1)), "val_loss": str(1.2 / (e + 1)),
                                   "train_acc": str(e / 10), "val_acc": str(e / 12)} for e in range(8)]),
        ("open_set", "open_set.png", RNG.gamma(2, 1, 50).astype(np.float32), 2.5, None)]


def _draw_all(figures: fg.Figures, folder) -> dict[str, bytes]:
    folder.mkdir()
    for name, file, *args in JOBS:
        figures.draw(name, folder / file, *args)
    figures.wait()
    return {file: (folder / file).read_bytes() for _, file, *_ in JOBS}


def test_a_second_process_draws_the_same_figures(tmp_path):
    here = _draw_all(fg.Figures(), tmp_path / "here")
    figures = fg.Figures.start()
    assert figures._proc is not None
    there = _draw_all(figures, tmp_path / "there")
    assert there == here and all(len(png) > 1000 for png in here.values())


def test_what_the_second_process_does_not_draw_is_drawn_here(tmp_path, monkeypatch):
    monkeypatch.setattr(fg.sys, "executable", "/bin/false")  # a process that exits at once, drawing nothing
    figures = fg.Figures.start()
    assert figures._proc is not None
    assert set(_draw_all(figures, tmp_path / "fallback")) == {file for _, file, *_ in JOBS}



def test_figures_sent_to_a_process_that_then_dies_are_drawn_here(tmp_path):
    """The process takes the first figure and exits without drawing it; the later ones find it gone. Every figure
    must still be on disk, the first one included."""
    proc = subprocess.Popen(["sh", "-c", "read job"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    figures = fg.Figures(proc)
    (tmp_path / "dies").mkdir()
    (name, file, *args), *rest = JOBS
    figures.draw(name, tmp_path / "dies" / file, *args)
    proc.wait(timeout=30)
    for name, file, *args in rest:
        figures.draw(name, tmp_path / "dies" / file, *args)
    figures.wait()
    assert all((tmp_path / "dies" / file).stat().st_size > 1000 for _, file, *_ in JOBS)
    assert all(figures.asked(tmp_path / "dies" / file) for _, file, *_ in JOBS)

@pytest.mark.trains
def test_a_run_s_own_process_does_not_load_matplotlib(shapes_dir, tmp_path):
    code = textwrap.dedent(f"""
        import os, sys
        os.environ["CLASSFORGE_CACHE"] = {str(tmp_path / "cache")!r}
        import classforge
        run = classforge.train({str(shapes_dir)!r}, {str(tmp_path / "run")!r}, epochs=3)
        assert "matplotlib" not in sys.modules, "matplotlib loaded in the run's process"
        print(sorted(p.name for p in run.glob("*.png")))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == str(["confusion_matrix.png", "curves.png", "open_set.png",
                                                        "reliability.png"])


def test_a_figure_drawn_again_ends_as_the_last_one_asked_for(tmp_path):
    """Scoring from cached features draws the test figures before a few files are checked; if the check fails,
    they are drawn again from the full scoring, and the file on disk must be that second one."""
    first, second = np.array([[5, 0], [0, 5]]), np.array([[1, 4], [3, 2]])
    here = fg.Figures()
    here.draw("confusion", tmp_path / "want.png", second, ["a", "b"])
    figures = fg.Figures.start()
    figures.draw("confusion", tmp_path / "got.png", first, ["a", "b"])
    figures.draw("confusion", tmp_path / "got.png", second, ["a", "b"])
    assert figures.asked(tmp_path / "got.png") and not figures.asked(tmp_path / "other.png")
    figures.wait()
    assert (tmp_path / "got.png").read_bytes() == (tmp_path / "want.png").read_bytes()
