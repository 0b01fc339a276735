"""Features computed by the check process while the run imports torch (runtime.ahead): the run finds exactly the
features it would have computed, counts them as computed, and loses only the overlap when the child stops early."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

import classforge
from classforge.core.config import TrainConfig
from classforge.data import precheck as pc
from classforge.runtime import ahead
from tests.conftest import tree_checksums

pytestmark = [pytest.mark.skipif(sys.platform == "win32", reason="the check runs in-process on Windows"),
              pytest.mark.trains]


def _train(data, out, cache, monkeypatch, **env):
    monkeypatch.setenv("CLASSFORGE_CACHE", str(cache))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    run = classforge.train(data, out, strategy="linear", epochs=5)
    for k in env:
        monkeypatch.delenv(k)
    return run, json.loads((run / "summary.json").read_text())


@pytest.fixture(scope="module")
def run_itself(shapes_dir, tmp_path_factory):
    """The run computing every feature itself."""
    tmp = tmp_path_factory.mktemp("itself")
    with pytest.MonkeyPatch.context() as m:
        return _train(shapes_dir, tmp / "run", tmp / "cache", m, CLASSFORGE_NO_AHEAD="1")


def test_features_computed_beside_the_imports_are_the_run_s_own(shapes_dir, run_itself, tmp_path, monkeypatch):
    before = tree_checksums(shapes_dir)
    run, summary = _train(shapes_dir, tmp_path / "run", tmp_path / "cache", monkeypatch)
    itself, own = run_itself
    n = own["embeddings"]["computed"]
    assert "ahead" not in own["embeddings"] and own["embeddings"]["cached"] == 0
    emb = summary["embeddings"]
    assert emb["ahead"] == emb["computed"] == n and emb["cached"] == 0 and emb["key"] == own["embeddings"]["key"]
    assert emb["ahead_loop_s"] > 0 and emb["files_per_s"] > 0
    # the same features to the bit: the same head, the same probabilities
    assert (run / "predictions.csv").read_bytes() == (itself / "predictions.csv").read_bytes()
    assert tree_checksums(shapes_dir) == before


def _fake_child(tmp_path, monkeypatch, body: str) -> None:
    """Run the check process as module `fake_ahead` (written to tmp_path) instead of runtime.ahead."""
    (tmp_path / "fake_ahead.py").write_text(textwrap.dedent(body))
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{':'.join(sys.path)}")
    real = pc.start_check
    monkeypatch.setattr(pc, "start_check",
                        lambda cfg, **kw: real(cfg, **{**kw, "child": "fake_ahead"} if "child" in kw else kw))


def test_a_child_that_computes_only_part_leaves_the_rest_to_the_run(shapes_dir, run_itself, tmp_path, monkeypatch):
    _fake_child(tmp_path, monkeypatch, """
        from classforge.runtime import ahead
        real = ahead.compute_ahead
        def half(graph, checked, *a):
            checked.good = checked.good[::2]
            return real(graph, checked, *a)
        ahead.compute_ahead = half
        ahead._child()
    """)
    run, summary = _train(shapes_dir, tmp_path / "run", tmp_path / "cache", monkeypatch)
    itself, own = run_itself
    emb = summary["embeddings"]
    assert 0 < emb["ahead"] < emb["computed"] == own["embeddings"]["computed"] and emb["cached"] == 0
    assert (run / "predictions.csv").read_bytes() == (itself / "predictions.csv").read_bytes()


def test_a_child_that_stops_after_the_check_costs_only_the_overlap(shapes_dir, run_itself, tmp_path, monkeypatch):
    _fake_child(tmp_path, monkeypatch, """
        import os
        from classforge.data.precheck import check_job, read_job
        job = read_job()
        check_job({**job, "spool_fd": -1})
        os._exit(3)
    """)
    run, summary = _train(shapes_dir, tmp_path / "run", tmp_path / "cache", monkeypatch)
    itself, own = run_itself
    assert "ahead" not in summary["embeddings"] and summary["embeddings"]["computed"] == own["embeddings"]["computed"]
    assert (run / "predictions.csv").read_bytes() == (itself / "predictions.csv").read_bytes()


def test_features_are_computed_ahead_only_where_the_run_would_compute_them_so(monkeypatch):
    for k in ("CLASSFORGE_NO_AHEAD", "WORLD_SIZE", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    cfg = TrainConfig().replace(data="d", accelerator="cpu")
    assert ahead.features_plan(cfg) == {"backbone": "auto"}
    assert ahead.features_plan(cfg.replace(strategy="two-stage", backbone="efficientnet_lite2")) is not None
    others = [dict(strategy="finetune"), dict(strategy="scratch"), dict(extract_engine="torch"),
              dict(weights="w.pth"), dict(pretrained=False), dict(backbone_args={"width": 2}),
              dict(preprocess="grayscale"), dict(views=4), dict(balance="augment-to 50"), dict(accelerator="gpu"),
              dict(devices="2"), dict(num_nodes=2)]
    for change in others:
        assert ahead.features_plan(cfg.replace(**change)) is None, change
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert ahead.features_plan(cfg) is None
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("CLASSFORGE_NO_AHEAD", "1")
    assert ahead.features_plan(cfg) is None


def test_the_check_process_computes_features_without_importing_torch(shapes_dir, tmp_path):
    """The child's whole point: it never loads torch (seconds). Its graph, preprocessing and cache code run here in
    a fresh interpreter, which must end without torch in sys.modules."""
    code = textwrap.dedent(f"""
        import os, sys
        os.environ["CLASSFORGE_CACHE"] = {str(tmp_path / "cache")!r}
        from classforge.data.discover import discover_for
        from classforge.data.kept import KeptImages
        from classforge.data.validate import validate
        from classforge.core.config import TrainConfig
        from classforge.models.graphs import torch_free_graph
        from classforge.runtime.ahead import compute_ahead
        ds = discover_for(TrainConfig().replace(data={str(shapes_dir)!r}))
        images = KeptImages()
        checked = validate(ds, 8, 10**8, keep=images)
        result = compute_ahead(torch_free_graph("auto", "image"), checked, images, 10**8, 2, lambda d, t: None)
        assert len(result["sha1s"]) == len(checked.good) > 0, result
        assert "torch" not in sys.modules, "torch was imported"
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
