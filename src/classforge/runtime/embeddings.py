"""Run the frozen backbone once per file and cache the embeddings on disk (keyed by file hash + backbone)."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import torch

from classforge.core.progress import progress
from classforge.data.discover import Sample
from classforge.runtime.decode import PREFETCH, decoded_batches
from classforge.runtime.distributed import ProcessGroup
from classforge.runtime.engines import Engine, example_input
from classforge.runtime.feature_cache import PREPROCESS_VERSION, EmbeddingCache, backbone_key

__all__ = ["PREPROCESS_VERSION", "EmbeddingCache", "backbone_key", "extract", "features_key"]

# input values per forward pass of a per-core engine, about one 224-px image: single-threaded ONNX Runtime is
# fastest per image one at a time (its activations stay in the core's own cache), while short clips are better
# a few at a time (they share the per-call cost); small passes also keep the cores evenly loaded to the end
PER_CORE_INPUT_VALUES = 3 * 224 * 224
# files decoded ahead while a per-core engine is built (an export takes a core for a second; the other decodes)
BUILD_AHEAD_FILES = 96


def features_key(name: str, backbone, arch: str, engine: Engine) -> str:
    """The cache key of `engine`'s features of `backbone` (registered as `name`, built with architecture
    arguments `arch`)."""
    return backbone_key(name, backbone.weights_source, backbone.spec.to_dict(), arch, engine.key_for(backbone))


def extract(backbone, samples: list[Sample], sha1s: list[str], preprocessor, key: str, views: int = 1,
            batch_size: int = 32, device: str = "cpu", desc: str = "Embedding",
            engine: Engine | None = None, group: ProcessGroup | None = None) -> tuple[np.ndarray, dict]:
    """(N, views, D) embeddings; cached ones are read, the rest computed in batches by `engine` (default: torch).
    With several processes (`group`), each computes its share of the missing files into the cache, then the main
    process reads them all (the others return zero rows for files they did not embed). Returns stats too."""
    if not samples:
        return np.zeros((0, views, backbone.feature_dim), np.float32), {"cached": 0, "computed": 0}
    group = group or ProcessGroup()
    cache = EmbeddingCache(key)
    group.barrier()  # every process sees the cache as it was before any of them wrote this split
    out: list[np.ndarray | None] = [cache.get(h, views) for h in sha1s]
    # the main process's cache decides what is missing: every process must make the same collective calls, and
    # caches that nodes do not share differ
    todo = group.from_main([i for i, a in enumerate(out) if a is None])
    stats = {"cached": len(samples) - len(todo), "computed": len(todo)}
    compute = Computation(backbone, samples, sha1s, preprocessor, cache, views, batch_size,
                          engine or Engine("torch", device=device), out, decode_threads(group),
                          per_core_workers(group))
    if todo and group.world_size == 1:
        stats.update(compute(todo, desc))
    elif todo:
        stats.update(shared_computation(compute, todo, group, desc))
    if not group.is_main:  # only the main process fits the head: rows it did not need here stay zero
        out = [np.zeros((views, backbone.feature_dim), np.float32) if a is None else a for a in out]
    return np.stack(out), stats


def shared_computation(compute: "Computation", todo: list[int], group: ProcessGroup, desc: str) -> dict:
    """Each process embeds its share of `todo` into the cache; the main process then reads the others' rows and
    embeds those its cache lacks (nodes without a shared cache)."""
    mine = group.shard(todo)
    own = compute(mine, f"{desc} ({len(mine)} of {len(todo)}, process {group.rank + 1}/{group.world_size})")
    group.barrier()  # every share is in the cache
    per_process = group.gather({"rank": group.rank, "computed": len(mine), "loop_s": own["loop_s"]})
    rest = [i for i in todo if compute.out[i] is None]
    if not group.is_main:
        return {**own, "by_others": len(rest), "missing": 0}
    for i in rest:
        compute.out[i] = compute.cache.get(compute.sha1s[i], compute.views)
    missing = [i for i in rest if compute.out[i] is None]
    if missing:
        compute(missing, f"{desc} (not in this cache)")
    return {**own, "by_others": len(rest) - len(missing), "missing": len(missing), "per_process": per_process}


def per_core_files(backbone, views: int = 1) -> int:
    """Files per forward pass of a per-core engine: about PER_CORE_INPUT_VALUES input values, 1 to 8 files."""
    values = example_input(backbone).numel() * max(1, views)
    return max(1, min(8, round(PER_CORE_INPUT_VALUES / values)))


def per_core_workers(group: ProcessGroup) -> int:
    """Workers for a per-core engine: every core this process may use (the run's processes on this machine share
    them), busy or not. Each computes alone, with no barrier to wait at, so a core that another process holds only
    slows the file on it, and the scheduler shares that core between the two."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, group.local_world_size))


def decode_threads(group: ProcessGroup) -> int:
    """Decoding threads that feed a GPU: the cores this process may use (the run's processes on this machine
    share them), 2 to 8."""
    return max(2, min(8, (os.cpu_count() or 2) // max(1, group.local_world_size)))


class Computation:
    """Embeds files by index into `out` and the cache: decoding in worker threads, the engine built once while
    the first batches decode."""

    def __init__(self, backbone, samples, sha1s, preprocessor, cache: EmbeddingCache, views: int, batch_size: int,
                 engine: Engine, out: list, gpu_decoders: int = 2, per_core_workers: int = 1):
        self.backbone, self.samples, self.sha1s, self.pre = backbone, samples, sha1s, preprocessor
        self.cache, self.views, self.batch_size, self.engine, self.out = cache, views, batch_size, engine, out
        self.gpu_decoders, self.per_core_workers = gpu_decoders, per_core_workers
        self.seed_lock = threading.Lock()

    def load(self, i: int) -> list[torch.Tensor]:
        raw = self.pre.load(self.samples[i].path)
        xs = [self.pre.eval(raw)]
        if self.views > 1:
            with self.seed_lock:  # global RNGs: one file at a time, so the same file always gets the same views
                seed = int(self.sha1s[i][:8], 16)
                torch.manual_seed(seed)
                np.random.seed(seed % (2**32))
                xs += [self.pre.train(raw) for _ in range(self.views - 1)]
        return xs

    def __call__(self, todo: list[int], desc: str) -> dict:
        """Embed files `todo`; build_s: the engine's one-time export/trace (0 when already built; the first
        batches decode meanwhile), loop_s: the rest, decoding + forward + cache writes."""
        if not todo:
            return {"build_s": 0.0, "loop_s": 0.0}
        built: dict = {}
        ready = threading.Event()
        engine = self.engine

        def build():
            t0 = time.perf_counter()
            try:
                built["forward"] = engine.build(self.backbone, self.cache.dir / "engine")
            finally:
                ready.set()  # workers waiting for the engine must not wait forever when building fails
            built["t0"], built["t1"] = t0, time.perf_counter()

        def featurize(chunk: list[int]) -> tuple[bool, torch.Tensor]:
            """(features?, tensor). Per-core engines run the forward pass in the decode worker too (one thread
            each, no shared pool) once the engine is built; before that, and for the other engines, the worker
            returns the decoded batch for a forward pass in the caller."""
            views = [v for i in chunk for v in self.load(i)]
            x = views[0][None] if len(views) == 1 else torch.stack(views)  # one photo per pass: no copy
            if engine.pins_memory:
                x = x.pin_memory()  # a non-blocking copy to the GPU
            if not engine.per_core or not ready.is_set():
                return False, x
            if "forward" not in built:
                raise RuntimeError("the engine could not be built")
            return True, built["forward"](x)

        per_core = engine.per_core
        chunk = per_core_files(self.backbone, self.views) if per_core else self.batch_size
        # per-core engines: a worker per core; a GPU: decoders enough to keep it fed; a CPU's batched pass: two, so
        # that decoding the next batch overlaps the forward pass that holds the cores
        workers = self.per_core_workers if per_core else (self.gpu_decoders if engine.pins_memory else 2)
        ahead = max(PREFETCH, 2 * workers, BUILD_AHEAD_FILES // chunk if per_core else 0)
        bar = progress(range(len(todo)), total=len(todo), desc=desc, unit="file")
        # the first batches decode while the engine is built (an export or trace on first use)
        for idx, (done, x) in decoded_batches(todo, featurize, chunk, workers=workers, prefetch=ahead, before=build):
            feats = (x if done else built["forward"](x)).numpy().reshape(len(idx), self.views, -1)
            for i, f in zip(idx, feats):
                self.out[i] = f
                self.cache.put(self.sha1s[i], f)
            bar.update(len(idx))
        bar.close()
        return {"build_s": built["t1"] - built["t0"], "loop_s": time.perf_counter() - built["t1"]}
