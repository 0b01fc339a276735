"""Features computed ahead, while the run is still importing torch.

`classforge train` spends seconds importing torch and the training code, on one core, while its file check runs
in a second process (data.precheck). Where the run's features are certain to come from a backbone's own ONNX
graph run by ONNX Runtime (the default linear run on a CPU: models.graphs), that process goes on, once the files
are checked, to compute the features of every good file into the embedding cache, under the key the run looks
them up by. The run then finds them there instead of computing them itself (`Prepared.features_ahead`). The graph,
the preprocessing and the session are the run's own, so the features are the same bits; the run still checks
them against PyTorch on a few files before it scores with them.

Whatever goes wrong in the child only loses the overlap: a file it did not compute is computed by the run."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.util import find_spec
from typing import TYPE_CHECKING

from classforge.core.config import TrainConfig
from classforge.core.heap import loading_libraries, own_this_process
from classforge.data import precheck
from classforge.data.precheck import Precheck, check_job, read_job

if TYPE_CHECKING:  # the command imports this module before it starts the child: numpy and the rest load there
    from classforge.models.graphs import TorchFreeGraph

NO_ARCHITECTURE_ARGS = json.dumps({})  # a run's architecture arguments in the cache key, when it has none
PROGRESS_EVERY = 16  # files between progress reports to the run


def start(cfg: TrainConfig) -> Precheck | None:
    """Start checking cfg's files in a second process (data.precheck.start_check), which also computes the
    features ahead where `features_plan` allows."""
    plan = features_plan(cfg)
    if plan is None:
        return precheck.start_check(cfg)
    return precheck.start_check(cfg, child=__name__, more={"features": plan})


def features_plan(cfg: TrainConfig) -> dict | None:
    """What the check process may compute ahead for cfg (its backbone's clean view), or None where the run could
    want other features: another strategy, engine, weights, architecture, preprocessing or number of views, or
    more than one process, or a GPU. Off with CLASSFORGE_NO_AHEAD=1."""
    if os.environ.get("CLASSFORGE_NO_AHEAD") == "1":
        return None
    if cfg.strategy not in ("auto", "linear", "two-stage") or cfg.extract_engine not in ("auto", "onnx"):
        return None
    if cfg.weights or not cfg.pretrained or cfg.backbone_args or cfg.preprocess or cfg.clip_seconds:
        return None
    if max(1, cfg.views) != 1 or cfg.augment_to or str(cfg.balance or "").startswith("augment-to"):
        return None
    if not one_cpu_process(cfg) or find_spec("onnxruntime") is None or find_spec("onnx") is None:
        return None
    return {"backbone": cfg.backbone}


def one_cpu_process(cfg: TrainConfig) -> bool:
    """Whether the run will be one process computing on the CPU, as far as can be told without torch: no more
    processes asked for or launched, and no GPU asked for or present (a machine with an NVIDIA device node counts
    as one that might run on it)."""
    env = os.environ
    if str(cfg.devices).strip() not in ("auto", "", "1") or int(cfg.num_nodes) > 1:
        return False
    if int(env.get("WORLD_SIZE", "1")) > 1 or int(env.get("SLURM_NTASKS", "1")) > 1:
        return False
    if cfg.accelerator == "cpu":
        return True
    return cfg.accelerator == "auto" and not any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/dxg"))


def features_key(graph: TorchFreeGraph) -> str:
    """The key the run computes (runtime.embeddings.features_key) for the backbone this graph is, built without
    architecture arguments, run by ONNX Runtime."""
    from classforge.runtime.feature_cache import OWN_GRAPH_ENGINE_KEY, backbone_key

    return backbone_key(graph.name, graph.weights_source, graph.spec.to_dict(), NO_ARCHITECTURE_ARGS,
                        OWN_GRAPH_ENGINE_KEY)


def compute_ahead(graph: TorchFreeGraph, checked, images, max_pixels: int, workers: int, report) -> dict:
    """Features of every good file `checked` lists that the cache lacks, computed into the cache by `workers`
    threads, each running single-threaded ONNX Runtime passes on the images the check decoded (`images`).
    `report(done, total)` hears of progress. Returns what was computed."""
    from classforge.data.image import ImagePreprocessor
    from classforge.runtime.feature_cache import EmbeddingCache

    cache = EmbeddingCache(features_key(graph))
    todo = {checked.info[s.path].sha1: s.path for s in checked.good}
    todo = {sha1: path for sha1, path in todo.items() if cache.get(sha1, 1) is None}
    t0 = time.perf_counter()
    session = ort_session_for(graph)
    t1 = time.perf_counter()
    pre = ImagePreprocessor(graph.spec, max_pixels=max_pixels, kept=images)
    counted = _Counter(len(todo), report)

    def embed(item: tuple[str, str]) -> str | None:
        sha1, path = item
        try:
            x = pre.eval_array(pre.load(path))
            if x is None:  # an image only torchvision can preprocess: the run computes it
                return None
            cache.put(sha1, session.run(None, {"input": x[None]})[0])  # (1, D): one view
            return sha1
        except Exception:  # noqa: BLE001 - this file is the run's to compute (and to report, if it fails there)
            return None
        finally:
            counted.one()

    with ThreadPoolExecutor(max(1, workers)) as pool:
        done = [sha1 for sha1 in pool.map(embed, todo.items()) if sha1]
    return {"key": cache.dir.name, "sha1s": done, "build_s": round(t1 - t0, 3),
            "loop_s": round(time.perf_counter() - t1, 3)}


def ort_session_for(graph: TorchFreeGraph):
    from classforge.runtime.ort import ort_session

    # one session for all workers: run() is thread-safe, and with one intra-op thread it computes on the caller
    return ort_session(graph.build(), threads=1)


class _Counter:
    def __init__(self, total: int, report):
        self.total, self.done, self.report, self._lock = total, 0, report, threading.Lock()
        report(0, total)

    def one(self) -> None:
        with self._lock:
            self.done += 1
            if self.done % PROGRESS_EVERY == 0 or self.done == self.total:
                self.report(self.done, self.total)


def _write(kind: str, message: dict) -> None:
    sys.stdout.write(json.dumps({kind: message}) + "\n")
    sys.stdout.flush()


def _child() -> None:
    """Check the job's files; then, for an image run whose backbone has a graph built without torch, compute their
    features, holding the decoded images here instead of spooling them to the run, which will not decode them."""
    with loading_libraries():
        import onnxruntime  # noqa: F401 - loaded here, where collection is off, rather than on first use
        import scipy.fft  # noqa: F401 - as onnxruntime (the check's perceptual hash)

        from classforge.data.kept import KeptImages
        from classforge.data.validate import validate  # noqa: F401 - as onnxruntime
        from classforge.models.graphs import torch_free_graph

    job = read_job()
    graph = torch_free_graph(job["more"]["features"]["backbone"], job["task"])
    if graph is None:
        check_job(job)
        return
    images = KeptImages()
    checked = check_job({**job, "spool_fd": -1}, keep=images)
    workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    result = compute_ahead(graph, checked, images, job["max_pixels"], workers,
                           lambda done, total: _write("progress", {"done": done, "total": total}))
    _write("features", result)
    os._exit(0)  # everything is written: the run need not wait for this interpreter's teardown


if __name__ == "__main__":
    own_this_process()
    _child()
