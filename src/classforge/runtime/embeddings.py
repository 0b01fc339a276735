"""Run the frozen backbone once per file and cache the embeddings on disk (keyed by file hash + backbone)."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import torch

from classforge.core.cache import cache_dir
from classforge.core.progress import progress
from classforge.data.discover import Sample
from classforge.runtime.decode import PREFETCH, decoded_batches
from classforge.runtime.engines import Engine

PREPROCESS_VERSION = 2  # bump when decoding/transforms change what a backbone sees
# files per forward pass for per-core engines: single-threaded ONNX Runtime is as fast per image at 1-8 files, and
# small chunks keep the cores evenly loaded to the end
PER_CORE_BATCH = 4


def backbone_key(name: str, weights_source: str, spec: dict, extra: str = "", engine: str | None = None) -> str:
    """Cache key: backbone, its weights, its input spec, the engine that computes the features (torch bf16 or
    fp32, ONNX Runtime fp32; default: torch), preprocessing version."""
    engine = engine or Engine("torch").key
    blob = json.dumps([name, weights_source, spec, engine, extra, PREPROCESS_VERSION], sort_keys=True)
    return f"{name}-{hashlib.sha1(blob.encode()).hexdigest()[:12]}"


class EmbeddingCache:
    """Files under cache_dir()/embeddings/<backbone key>/<sha1[:2]>/<sha1>.npy, shape (views, D).
    Row 0 is the clean (eval-transform) view; rows 1.. are augmented views (seeded by file hash + row)."""

    def __init__(self, key: str):
        self.dir = cache_dir() / "embeddings" / key

    def _path(self, sha1: str) -> Path:
        return self.dir / sha1[:2] / f"{sha1}.npy"

    def get(self, sha1: str, views: int) -> np.ndarray | None:
        p = self._path(sha1)
        if not p.exists():
            return None
        try:
            a = np.load(p)
        except (OSError, ValueError):
            return None
        return a[:views] if a.shape[0] >= views else None

    def put(self, sha1: str, arr: np.ndarray) -> None:
        p = self._path(sha1)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, arr.astype(np.float32))
        tmp.replace(p)


def extract(backbone, samples: list[Sample], sha1s: list[str], preprocessor, key: str, views: int = 1,
            batch_size: int = 32, device: str = "cpu", desc: str = "Embedding",
            engine: Engine | None = None) -> tuple[np.ndarray, dict]:
    """(N, views, D) embeddings; cached ones are read, the rest computed in batches by `engine` (default: torch).
    Returns stats too."""
    if not samples:
        return np.zeros((0, views, backbone.feature_dim), np.float32), {"cached": 0, "computed": 0}
    cache = EmbeddingCache(key)
    out: list[np.ndarray | None] = [cache.get(h, views) for h in sha1s]
    todo = [i for i, a in enumerate(out) if a is None]
    stats = {"cached": len(samples) - len(todo), "computed": len(todo)}
    if not todo:
        return np.stack(out), stats
    engine = engine or Engine("torch", device=device)
    seed_lock = threading.Lock()

    def load(i: int):
        raw = preprocessor.load(samples[i].path)
        xs = [preprocessor.eval(raw)]
        if views > 1:
            with seed_lock:  # global RNGs: one file at a time, so the same file always gets the same views
                seed = int(sha1s[i][:8], 16)
                torch.manual_seed(seed)
                np.random.seed(seed % (2**32))
                xs += [preprocessor.train(raw) for _ in range(views - 1)]
        return i, xs

    def load_chunk(chunk: list[int]):
        loaded = [load(i) for i in chunk]
        return torch.stack([x for _, vs in loaded for x in vs])

    built: dict = {}
    ready = threading.Event()

    def build():
        t0 = time.perf_counter()
        try:
            built["forward"] = engine.build(backbone, cache.dir / "engine")
        finally:
            ready.set()  # workers waiting for the engine must not wait forever when building fails
        built["t0"], built["t1"] = t0, time.perf_counter()

    def featurize(chunk: list[int]):
        """Per-core engines run the forward pass in the decode worker too (one thread each, no shared pool);
        the others return the decoded batch for one forward pass on all cores in the caller."""
        x = load_chunk(chunk)
        if not engine.per_core:
            return x
        ready.wait()
        if "forward" not in built:
            raise RuntimeError("the engine could not be built")
        return built["forward"](x)

    per_core = engine.per_core
    chunk = PER_CORE_BATCH if per_core else batch_size
    workers = max(1, torch.get_num_threads()) if per_core else 2
    bar = progress(range(len(todo)), total=len(todo), desc=desc, unit="file")
    # the first batches decode while the engine is built (an export or trace on first use)
    for idx, x in decoded_batches(todo, featurize, chunk, workers=workers, prefetch=max(PREFETCH, 2 * workers),
                                  before=build):
        feats = (x if per_core else built["forward"](x)).numpy().reshape(len(idx), views, -1)
        for i, f in zip(idx, feats):
            out[i] = f
            cache.put(sha1s[i], f)
        bar.update(len(idx))
    bar.close()
    t0, t1 = built["t0"], built["t1"]
    # build_s: the engine's one-time export/trace (0 when already built; the first batches decode meanwhile);
    # loop_s: the rest, decoding + forward + cache writes
    stats.update(build_s=t1 - t0, loop_s=time.perf_counter() - t1)
    return np.stack(out), stats
