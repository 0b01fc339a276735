"""Extraction engines: ONNX Runtime gives the torch features, features of different engines are cached apart,
and a linear run trains through each engine and reuses its own cache."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

import classforge
from classforge.core.errors import ClassforgeError
from classforge.data.discover import Sample
from classforge.data.preprocess import make_preprocessor
from classforge.models.registry import Backbone, create_backbone
from classforge.runtime import embeddings as emb
from classforge.runtime import engines
from classforge.runtime.distributed import ProcessGroup
from classforge.runtime.engines import Engine, engine_for, fast_cpu_bf16, resolve_engine
from classforge.runtime.feature_cache import OWN_GRAPH_ENGINE_KEY


@pytest.mark.parametrize("name", ["efficientnet_lite0", "cnn_small"])
def test_onnx_engine_reproduces_torch_fp32_features(shapes_dir, tmp_path, name, monkeypatch):
    """A backbone that builds its own ONNX graph is never exported (nor cached: building it is cheap); another is
    exported once into the cache and reused."""
    bb = create_backbone(name, pretrained=name.startswith("efficientnet")).eval()
    pre = make_preprocessor(bb.spec)
    x = torch.stack([pre.eval(pre.load(p)) for p in sorted(shapes_dir.rglob("*.png"))[:12]])
    with torch.no_grad():
        ref = bb(x).numpy()  # plain eager fp32
    with monkeypatch.context() as m:
        if bb.builds_onnx_graph:
            m.setattr(engines, "torch_to_onnx_bytes", lambda *a, **k: pytest.fail("exported despite its own graph"))
        out = Engine("onnx").build(bb, tmp_path / "e")(x).numpy()
    engines.wait_for_cache_writes()  # an export is written to the cache beside the run
    assert out.shape == ref.shape and np.abs(out - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())
    if bb.builds_onnx_graph:
        assert not (tmp_path / "e").exists()
        return
    assert (tmp_path / "e" / "backbone.onnx").is_file() and not list((tmp_path / "e").glob("*.tmp"))
    with monkeypatch.context() as m:  # the exported file is reused: no second export
        m.setattr(engines, "torch_to_onnx_bytes", lambda *a, **k: pytest.fail("exported again"))
        again = Engine("onnx").build(bb, tmp_path / "e")(x[:3]).numpy()
    np.testing.assert_allclose(again, out[:3], atol=1e-5)


def test_engine_resolution_and_keys(monkeypatch):
    # ONNX Runtime on every CPU (exact fp32 features, one single-threaded pass per core), bf16 or not
    assert resolve_engine("auto") == "onnx" and resolve_engine("torch") == "torch"
    assert Engine("onnx").per_core and Engine("onnx").exact and not Engine("torch").per_core
    monkeypatch.setenv("CLASSFORGE_NO_BF16", "1")
    assert resolve_engine("auto") == "onnx"
    assert resolve_engine("auto", device="cuda") == "torch"
    with pytest.raises(ClassforgeError, match="--extract-engine"):
        resolve_engine("tensorrt")
    keys = {Engine("torch").key, Engine("onnx").key, Engine("torch", device="cuda").key}
    assert len(keys) == 3
    assert len({emb.backbone_key("m", "w", {}, "", k) for k in keys}) == 3
    # ONNX Runtime's features from a backbone's own graph are kept apart from those of an exported graph
    lite, cnn = create_backbone("efficientnet_lite0", pretrained=False), create_backbone("cnn_small")
    assert Engine("onnx").key_for(lite) == OWN_GRAPH_ENGINE_KEY and Engine("onnx").key_for(cnn) == "onnx"
    assert Engine("torch").key_for(lite) == Engine("torch").key


def test_unexportable_backbone_falls_back_to_torch(tmp_path):
    class NoExport(Backbone):  # the engine takes backbones, which declare bf16 safety and the rest
        spec = create_backbone("cnn_small").spec
        feature_dim = 4

        def forward(self, x):
            return torch.from_numpy(x.mean((2, 3)).numpy()).repeat(1, 2)[:, :4]  # numpy breaks the tracer

    e = Engine("onnx")
    with pytest.warns(UserWarning, match="onnx engine unavailable"):
        run = e.build(NoExport(), tmp_path)
    assert "torch" in e.note and run(torch.zeros(2, 3, 32, 32)).shape == (2, 4)


def test_linear_run_through_each_engine(shapes_dir, tmp_path):
    for kind in ("torch", "onnx"):
        run = classforge.train(shapes_dir, tmp_path / kind, epochs=20, extract_engine=kind)
        s = json.loads((run / "summary.json").read_text())
        assert s["embeddings"]["engine"] == engine_for(kind).key
        assert s["test"]["accuracy"] >= 0.9
        # a second run on the same data reads every embedding from the cache of its own engine
        again = classforge.train(shapes_dir, tmp_path / f"{kind}-again", epochs=2, extract_engine=kind)
        s2 = json.loads((again / "summary.json").read_text())
        assert s2["embeddings"]["computed"] == 0 and s2["embeddings"]["key"] == s["embeddings"]["key"]


def test_extract_with_an_engine_on_samples(shapes_dir, tmp_path):
    bb = create_backbone("efficientnet_lite0", pretrained=True)
    pre = make_preprocessor(bb.spec)
    paths = sorted(shapes_dir.rglob("*.png"))[:5]
    samples = [Sample(str(p), p.name, p.parent.name) for p in paths]
    sha = [f"{i:040d}" for i in range(5)]
    key = f"engine-test-{uuid.uuid4().hex}"  # tmp_path names repeat across sessions; the cache persists
    feats, stats = emb.extract(bb, samples, sha, pre, key, 1, engine=Engine("onnx"))
    assert feats.shape == (5, 1, bb.feature_dim) and stats["computed"] == 5
    # ONNX Runtime's features are eager fp32 PyTorch's on every CPU (they are what a linear run scores from)
    with torch.no_grad():
        exact = bb.eval()(torch.stack([pre.eval(pre.load(p)) for p in paths])).numpy()
    np.testing.assert_allclose(feats[:, 0], exact, atol=1e-4 * max(1.0, float(np.abs(exact).max())))
    ref, stats = emb.extract(bb, samples, sha, pre, key + "-torch", 1, engine=Engine("torch"))
    assert stats["computed"] == 5
    cos = (ref[:, 0] * exact).sum(1) / np.linalg.norm(ref[:, 0], axis=1) / np.linalg.norm(exact, axis=1)
    assert cos.min() > 0.99  # torch: fp32, or bf16 where native (close, not equal)


@pytest.mark.skipif(not fast_cpu_bf16(), reason="the frozen bf16 graph is used only on CPUs with native bf16")
def test_torch_engine_frozen_bf16_graph_matches_fp32_features(shapes_dir, tmp_path, monkeypatch):
    """On native-bf16 CPUs the torch engine runs a frozen TorchScript graph under bf16 autocast: its features
    stay within bf16 noise of eager fp32 (cosine >= 0.99 per image, for any batch size), and it has its own
    cache key, apart from eager bf16 (CLASSFORGE_NO_JIT=1)."""
    from classforge.runtime import engines

    bb = create_backbone("efficientnet_lite0", pretrained=True).eval()
    pre = make_preprocessor(bb.spec)
    x = torch.stack([pre.eval(pre.load(p)) for p in sorted(shapes_dir.rglob("*.png"))[:9]])
    with torch.no_grad():
        ref = bb(x)
    frozen = engines._freeze_bf16(engines.prepare_fast(bb, "image"), x[:2].contiguous(memory_format=torch.channels_last))
    assert isinstance(frozen, torch.jit.ScriptModule)
    run = Engine("torch").build(bb, tmp_path)
    for batch in (x, x[:5], x[:1]):
        out = run(batch)
        cos = torch.nn.functional.cosine_similarity(out, ref[: len(batch)], dim=1)
        assert out.dtype == torch.float32 and out.shape == (len(batch), bb.feature_dim) and cos.min() > 0.99
    jit_key = Engine("torch").key
    monkeypatch.setenv("CLASSFORGE_NO_JIT", "1")
    assert Engine("torch").key != jit_key and engines.jit_bf16() is False


def test_final_evaluation_through_onnx_runtime(shapes_dir, tmp_path, monkeypatch):
    """With --eval-engine onnx the run is scored through a parity-checked RUN/model.onnx; its predictions are the
    PyTorch fp32 ones, and `predict` then uses the same file. --eval-engine torch keeps PyTorch."""
    import csv

    from classforge.runtime.predictor import Predictor

    monkeypatch.setenv("CLASSFORGE_NO_BF16", "1")
    # by default a linear run scores from its exact cached features, checked on a few files through PyTorch:
    # exporting would cost more than that check, so no model.onnx is written
    default = classforge.train(shapes_dir, tmp_path / "default", epochs=2)
    s = json.loads((default / "summary.json").read_text())
    assert s["evaluation"]["engine"] == "torch-fp32" and s["evaluation"]["cached_features"]["passed"]
    assert not (default / "model.onnx").exists()
    run = classforge.train(shapes_dir, tmp_path / "ort", epochs=10, eval_engine="onnx")
    s = json.loads((run / "summary.json").read_text())
    assert s["evaluation"]["engine"] == "onnxruntime-fp32" and (run / "model.onnx").is_file()
    assert s["evaluation"]["parity_max_abs_logit_diff"] < 1e-3
    assert json.loads((run / "export.json").read_text())["parity"]["passed"]
    with open(run / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    ref = Predictor.from_run(run, backend="torch")
    probs = ref.predict_proba([shapes_dir / r["path"] for r in rows])
    assert [ref.labels[i] for i in probs.argmax(1)] == [r["predicted"] for r in rows]
    np.testing.assert_allclose(probs.max(1), [float(r["probability"]) for r in rows], atol=1e-4)
    assert classforge.load(run).backend == "onnxruntime"
    # new weights (a resumed run) make the exported files stale: saving the model removes them
    from classforge.core.config import TrainConfig
    from classforge.runtime.predictor import load_run_model
    from classforge.training.flow import save_model

    model, _, labels = load_run_model(run)
    save_model(run, model, TrainConfig.load(run / "config.yaml"), labels)
    assert not (run / "model.onnx").exists() and not (run / "export.json").exists()
    assert classforge.load(run).backend == "torch"
    plain = classforge.train(shapes_dir, tmp_path / "torch", epochs=2, eval_engine="torch")
    assert json.loads((plain / "summary.json").read_text())["evaluation"]["engine"] == "torch-fp32"
    assert not (plain / "model.onnx").exists()
    with pytest.raises(ClassforgeError, match="--eval-engine"):
        classforge.train(shapes_dir, tmp_path / "bad", epochs=1, eval_engine="tensorrt")


def test_eval_engine_resolution(monkeypatch):
    from classforge.runtime.engines import resolve_eval_engine

    assert resolve_eval_engine("torch") == "torch" and resolve_eval_engine("onnx", "torch") == "onnx"
    assert resolve_eval_engine("auto", "onnx") == "onnx" and resolve_eval_engine("auto", "torch") == "torch"
    monkeypatch.setenv("CLASSFORGE_NO_BF16", "1")  # a CPU without native bf16: extraction and evaluation on ORT
    assert resolve_eval_engine("auto") == "onnx"
    with pytest.raises(ClassforgeError, match="--eval-engine must be one of"):
        resolve_eval_engine("tensorrt")


class CountingPre:
    """A preprocessor that counts the files it loaded, and the threads that loaded them."""

    def __init__(self, pre):
        import threading

        self.pre, self.loaded, self.threads, self.lock = pre, [0], set(), threading.Lock()

    def load(self, src):
        import threading

        with self.lock:
            self.loaded[0] += 1
            self.threads.add(threading.current_thread().name)
        return self.pre.load(src)

    def eval(self, raw):
        return self.pre.eval(raw)


def test_extraction_builds_its_engine_once_and_decodes_a_bounded_way_ahead(shapes_dir, tmp_path):
    """One engine build per backbone (not per split), and at most PREFETCH batches decoded ahead of the forward
    pass: decoding outruns the forward pass, so an unbounded queue would hold a whole dataset in memory."""
    class Counting(Engine):
        builds = 0

        def build(self, backbone, cache):
            if self._built is None or self._built[0] is not backbone:
                Counting.builds += 1
            return super().build(backbone, cache)

    bb = create_backbone("cnn_small")
    pre = make_preprocessor(bb.spec)
    ahead, counting = [], CountingPre(pre)
    loaded = counting.loaded
    paths = sorted(shapes_dir.rglob("*.png"))
    samples = [Sample(str(p), p.name, p.parent.name) for p in paths]
    engine = Counting("torch")
    run = engine.build(bb, tmp_path / "e")
    assert engine.build(bb, tmp_path / "e") is run and Counting.builds == 1
    done = [0]
    real = engine._built[2]

    def slow(x):  # the forward pass is the slow side, as with a real backbone
        import time

        time.sleep(0.05)
        with counting.lock:
            ahead.append(loaded[0] - done[0])
        done[0] += len(x)
        return real(x)

    key = f"bounded-{uuid.uuid4().hex}"
    engine._built = (bb, emb.EmbeddingCache(key).dir / "engine", slow)  # extract() builds for this cache: reused
    sha = [f"{uuid.uuid4().hex}{i:08d}" for i in range(len(samples))]
    feats, stats = emb.extract(bb, samples, sha, counting, key, 1, batch_size=2, engine=engine)
    assert stats["computed"] == len(samples) == feats.shape[0] and Counting.builds == 1
    assert len(samples) > 2 * (emb.PREFETCH + 1) and max(ahead) <= 2 * (emb.PREFETCH + 1)


def test_per_core_extraction_keeps_decoding_while_its_engine_is_built(shapes_dir, tmp_path):
    """A per-core engine's export holds one core for a while: the workers decode further files meanwhile (more
    than one chunk each, at most BUILD_AHEAD_FILES), and those are embedded like the rest, in order. There is a
    worker on every core even where torch was given one thread because another process holds a core: the
    workers wait at no barrier."""

    bb = create_backbone("cnn_small")
    pre = make_preprocessor(bb.spec)
    built_at, counting = [], CountingPre(pre)

    paths = sorted(shapes_dir.rglob("*.png"))
    enough = min(len(paths), emb.BUILD_AHEAD_FILES) // 2  # far more than the few chunks a plain prefetch holds

    class SlowBuild(Engine):
        def build(self, backbone, cache):
            if self._built is None:  # the build lasts until the workers have decoded `enough` files
                deadline = time.monotonic() + 60
                while counting.loaded[0] < enough:
                    assert time.monotonic() < deadline, "the workers decoded nothing while the engine was built"
                    time.sleep(0.01)
                time.sleep(0.05)  # a little longer, for any decoding beyond the bound to show
                built_at.append(counting.loaded[0])
            return super().build(backbone, cache)

    samples = [Sample(str(p), p.name, p.parent.name) for p in paths]
    slow = SlowBuild("onnx")
    assert slow.per_core
    sha = [f"{uuid.uuid4().hex}{i:08d}" for i in range(len(samples))]
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as adapted_threads leaves it beside a busy process
    try:
        feats, stats = emb.extract(bb, samples, sha, counting, f"ahead-{uuid.uuid4().hex}", 1, engine=slow)
    finally:
        torch.set_num_threads(before)
    assert stats["computed"] == len(samples)
    assert len(counting.threads) == emb.per_core_workers(ProcessGroup())
    assert enough <= built_at[0] <= emb.BUILD_AHEAD_FILES + 2
    ref = Engine("onnx").build(bb, tmp_path / "ref")
    want = ref(torch.stack([pre.eval(pre.load(p)) for p in paths])).numpy()
    np.testing.assert_allclose(feats[:, 0], want, atol=1e-5)


def test_per_core_passes_hold_about_one_photo_s_worth_of_input():
    """One 224-px (or larger) photo per pass, a few one-second clips, at most 8 small images."""
    assert emb.per_core_files(create_backbone("efficientnet_lite0", pretrained=False)) == 1
    assert emb.per_core_files(create_backbone("efficientnet_lite2", pretrained=False)) == 1
    assert emb.per_core_files(create_backbone("cnn_small")) == 8  # 32 px
    clips = emb.per_core_files(create_backbone("audio_cnn"))
    assert 2 <= clips <= 8
    assert emb.per_core_files(create_backbone("audio_cnn"), views=4) < clips


def test_per_core_workers_take_every_core_shared_by_the_run_s_processes(monkeypatch):
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert emb.per_core_workers(ProcessGroup()) == 8
    assert emb.per_core_workers(ProcessGroup(world_size=3, local_world_size=3)) == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert emb.per_core_workers(ProcessGroup(world_size=3, local_world_size=3)) == 1


def test_busy_cores_measures_over_the_time_since_the_last_reading_instead_of_sleeping(monkeypatch):
    """After note_start() (the CLI's first step), a busy_cores() call at least `interval_s` later reads the
    cores at once, over the whole time since; one that follows too soon (or long after) measures afresh."""
    import types

    from classforge.core import cpu_load

    now, slept = [1000.0], []

    def sleep(s):
        slept.append(s)
        now[0] += s

    clock = types.SimpleNamespace(monotonic=lambda: now[0], sleep=sleep, process_time=time.process_time)
    monkeypatch.setattr(cpu_load, "time", clock)
    monkeypatch.setattr(cpu_load, "_last_reading", None)
    cpu_load.note_start()
    now[0] += 0.35
    cpu_load.busy_cores(0.3)
    assert slept == []  # measured over the 0.35 s since note_start
    cpu_load.busy_cores(0.3)
    assert slept == [0.3]  # the last reading is only just taken: it waits for its interval
    now[0] += 60.0
    cpu_load.busy_cores(0.3)
    assert slept == [0.3, 0.3]  # a reading a minute old says little about now


def test_threads_follow_the_cores_other_work_leaves_free(monkeypatch):
    """One busy core of two: one torch thread; none busy: all cores; the caller's count comes back afterwards."""
    import os

    import torch

    from classforge.runtime import threads

    cores = os.cpu_count() or 1
    assert threads.threads_for_this_machine(busy=0.1) == (cores, f"{cores} cores free")
    if cores >= 2:
        n, why = threads.threads_for_this_machine(busy=1.0)
        assert n == cores - 1 and "1 of" in why
    assert threads.threads_for_this_machine(busy=cores + 3)[0] == 1  # never below one
    ticks = iter([(100, 1000), (100 + 250 * cores, 1000 + 500 * cores)])  # half of every core busy
    own = iter([0.0, 0.0])  # this process used no CPU meanwhile
    assert threads.busy_cores(0.0, read=lambda: next(ticks), own_time=lambda: next(own)) == pytest.approx(cores / 2)
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "busy_cores", lambda: float(cores))  # every core taken by others
    with threads.adapted_threads(say=lambda *_: None) as chosen:
        assert chosen["torch"] == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_a_child_doing_the_run_s_work_is_not_counted_as_other_load():
    """The CPU time of a child counted as own (the file check run beside the imports) is this process's, while it
    runs and after it is waited for; an uncounted child's is not."""
    import subprocess
    import sys

    from classforge.core import cpu_load

    # the child burns 0.6 s of CPU, then waits for its stdin to close: it cannot end (and be collected into
    # os.times()) before the test has read the running figure
    burn = [sys.executable, "-c", "import sys, time\nend = time.process_time() + 0.6\n"
            "while time.process_time() < end: pass\nsys.stdin.read()"]

    def own_cpu_while(counted: bool) -> tuple[float, float]:
        before = cpu_load.own_cpu_s()
        child = subprocess.Popen(burn, stdin=subprocess.PIPE)
        if counted:
            cpu_load.count_as_own(child.pid)
        deadline = time.monotonic() + 60
        while cpu_load._child_cpu_s(child.pid) < 0.5:
            assert time.monotonic() < deadline and child.poll() is None
            time.sleep(0.02)
        running = cpu_load.own_cpu_s() - before
        child.stdin.close()
        child.wait()
        cpu_load.stop_counting(child.pid)
        return running, cpu_load.own_cpu_s() - before

    running, done = own_cpu_while(counted=True)
    assert running >= 0.5 and done >= 0.6
    running, _ = own_cpu_while(counted=False)
    assert running < 0.3
