"""The on-disk cache of a frozen backbone's features, and its keys. Free of torch, so that a process that has not
imported it (seconds) can fill the cache for the run that is still importing it."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np

from classforge.core.cache import cache_dir
from classforge.core.files import write_atomically

PREPROCESS_VERSION = 2  # bump when decoding/transforms change what a backbone sees
# features ONNX Runtime computes from a backbone's own graph (Backbone.onnx_graph), whose folded batch norms round
# differently from the graph torch's exporter writes: kept apart from those
OWN_GRAPH_ENGINE_KEY = "onnx-own-graph"


def backbone_key(name: str, weights_source: str, spec: dict, extra: str, engine: str) -> str:
    """Cache key: backbone, its weights, its input spec, architecture arguments (`extra`), the engine that computes
    the features (torch bf16 or fp32, ONNX Runtime fp32), preprocessing version."""
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
        buffer = io.BytesIO()
        np.save(buffer, arr.astype(np.float32))
        write_atomically(p, buffer.getvalue())  # the processes of a run may embed the same file
