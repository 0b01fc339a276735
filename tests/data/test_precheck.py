"""The file check run in a child process while the training code loads: the run sees exactly what checking the
files itself would give, with the decoded images handed over, and anything that goes wrong in the child only
costs the overlap."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from PIL import Image

from classforge.core.config import TrainConfig
from classforge.data import precheck as pc
from classforge.training.prepared import prepare_data
from tests.conftest import bad_image_folder, draw_sample, tree_checksums

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the check runs in-process on Windows")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = bad_image_folder(tmp_path_factory.mktemp("precheck") / "d")
    rng = np.random.default_rng(1)
    draw_sample("stripes", rng, 96).convert("L").save(root / "stripes" / "grey.png")  # one band
    draw_sample("circle", rng, 80).save(root / "circle" / "photo.jpg", quality=85)
    rgba = draw_sample("circle", rng, 72).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(root / "circle" / "translucent.png")  # flattened onto white by the check
    return root


def _prepared(cfg, monkeypatch, cache, precheck: bool):
    monkeypatch.setenv("CLASSFORGE_CACHE", str(cache))
    pending = pc.start_check(cfg) if precheck else None
    try:
        return prepare_data(cfg, keep_decoded=True, precheck=pending), pending
    finally:
        if pending is not None:
            pending.close()


def _kept_pixels(prep) -> dict[str, np.ndarray]:
    taken = {s.path: prep.kept.take(s.path) for s in prep.checked.good}
    return {path: np.asarray(img) for path, img in taken.items() if img is not None}


def test_the_run_sees_what_its_own_check_gives(data, tmp_path, monkeypatch):
    before = tree_checksums(data)
    cfg = TrainConfig().replace(data=str(data))
    own, _ = _prepared(cfg, monkeypatch, tmp_path / "cache-own", precheck=False)
    child, pending = _prepared(cfg, monkeypatch, tmp_path / "cache-child", precheck=True)
    assert pending is not None

    assert [s.path for s in child.checked.good] == [s.path for s in own.checked.good]
    assert child.checked.skipped == own.checked.skipped
    assert child.checked.info == own.checked.info
    assert [(s.path, s.split) for s in child.samples] == [(s.path, s.split) for s in own.samples]
    assert {r for r, _ in child.checked.skipped} >= {"circle/truncated.jpg", "stripes/notes.jpg", "stripes/bomb.png"}

    # every image the in-process check kept came from the child, pixel for pixel
    own_px, child_px = _kept_pixels(own), _kept_pixels(child)
    assert len(own_px) == len(own.checked.good) and set(child_px) == set(own_px)
    for path, px in own_px.items():
        np.testing.assert_array_equal(child_px[path], px, err_msg=path)
    assert {Image.open(p).mode for p in own_px} >= {"L", "RGBA", "RGB"}
    assert tree_checksums(data) == before  # the data folder is only read


def _failing_child(tmp_path, reads_its_job: bool) -> str:
    """A stand-in for the Python that runs the child: it fails, after reading its job or before."""
    script = tmp_path / ("reads-then-fails" if reads_its_job else "fails-at-once")
    script.write_text("#!/bin/sh\n" + ("cat > /dev/null\n" if reads_its_job else "") + "exit 3\n")
    script.chmod(0o755)
    return str(script)


def test_a_child_that_fails_costs_only_the_overlap(data, tmp_path, monkeypatch):
    cfg = TrainConfig().replace(data=str(data))
    own, _ = _prepared(cfg, monkeypatch, tmp_path / "cache-own", precheck=False)
    monkeypatch.setattr(pc.sys, "executable", _failing_child(tmp_path, reads_its_job=True))
    failed, pending = _prepared(cfg, monkeypatch, tmp_path / "cache-failed", precheck=True)
    assert pending is not None and pending.wait(None) is False
    assert failed.checked.info == own.checked.info
    assert set(_kept_pixels(failed)) == set(_kept_pixels(own))  # the run decoded and kept them itself


def test_a_child_gone_before_its_job_is_sent_leaves_the_run_to_check_alone(data, tmp_path, monkeypatch):
    monkeypatch.setattr(pc.sys, "executable", _failing_child(tmp_path, reads_its_job=False))
    big = {"pad": "x" * 2**20}  # more than a pipe holds, so the write meets the closed pipe every time
    assert pc.start_check(TrainConfig().replace(data=str(data)), more=big) is None


def test_a_child_that_will_not_read_its_job_is_stopped_not_left_running(data, tmp_path, monkeypatch):
    script = tmp_path / "closes-its-input"
    script.write_text("#!/bin/sh\nexec 0<&-\nsleep 60\n")  # alive, but nobody reads the job
    script.chmod(0o755)
    monkeypatch.setattr(pc.sys, "executable", str(script))
    before = _children()
    assert pc.start_check(TrainConfig().replace(data=str(data)), more={"pad": "x" * 2**20}) is None
    assert _children() == before


def _children() -> set[int]:
    """This process's child processes, zombies included."""
    found = set()
    for task in os.listdir(f"/proc/{os.getpid()}/task"):
        with open(f"/proc/{os.getpid()}/task/{task}/children") as f:
            found |= {int(p) for p in f.read().split()}
    return found


def test_images_past_the_budget_are_not_spooled(data, tmp_path, monkeypatch):
    monkeypatch.setattr(pc, "KEEP_MB", 0.05)  # room for a few 64 px images
    cfg = TrainConfig().replace(data=str(data))
    prep, _ = _prepared(cfg, monkeypatch, tmp_path / "cache", precheck=True)
    assert 0 < prep.kept.stats["kept"] < len(prep.checked.good)
    assert prep.kept.used <= 0.05 * 2**20


def test_no_precheck_when_switched_off(data, monkeypatch):
    monkeypatch.setenv("CLASSFORGE_NO_PRECHECK", "1")
    assert pc.start_check(TrainConfig().replace(data=str(data))) is None


def test_a_full_spool_stops_keeping_without_recording_a_partial_image(tmp_path):
    """A write that /dev/shm cuts short (it is full) keeps no entry for that image, and nothing after it."""

    class FullAfter:
        def __init__(self, room: int):
            self.room, self.pos = room, 0

        def tell(self):
            return self.pos

        def write(self, data):
            n = min(len(data), self.room - self.pos)
            self.pos += n
            return n

    spool = pc.Spool(os.open(tmp_path / "spool", os.O_CREAT | os.O_RDWR), max_mb=1)
    spool.file.close()
    spool.file = FullAfter(room=3 * 64 * 64 + 100)
    for i in range(3):
        spool.offer(f"f{i}.png", Image.new("RGB", (64, 64)))
    assert [e[0] for e in spool.entries] == ["f0.png"]
    assert spool.max_bytes == 0


@pytest.mark.trains  # calls the training entry point, which stops at the options before training
def test_a_run_that_stops_before_its_check_leaves_no_child(data, monkeypatch):
    from classforge import api
    from classforge.core.errors import ClassforgeError

    started = []
    real = pc.start_check
    monkeypatch.setattr(pc, "start_check", lambda cfg, **kw: started.append(real(cfg, **kw)) or started[-1])
    with pytest.raises(ClassforgeError, match="--strategy"):
        api.train_config(TrainConfig().replace(data=str(data), strategy="no-such-strategy"))
    assert started and started[0] is not None
    assert started[0]._proc.poll() is not None  # stopped and waited for
