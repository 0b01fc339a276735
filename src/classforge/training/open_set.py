"""Fit the run's "unknown" score once training is over: class means and a shared covariance of the training
files' features (models.open_set). A linear run already has them in the embedding cache; a network that
trained its backbone (fine-tune, two-stage, scratch) runs its final backbone over the training files once."""

from __future__ import annotations

import numpy as np
import torch

from classforge.core.config import TrainConfig
from classforge.core.progress import progress
from classforge.data.preprocess import make_preprocessor
from classforge.models.open_set import MahalanobisScore
from classforge.models.registry import Classifier
from classforge.runtime.decode import decoded_batches
from classforge.runtime.engines import forward_batches
from classforge.training.prepared import Prepared

MAX_FIT_FILES = 3000  # enough for the means and the shrunk covariance; a larger training split is subsampled


def attach_open_set(model: Classifier, data: Prepared, cfg: TrainConfig,
                    train_features: np.ndarray | None = None) -> dict | None:
    """Set model.open_set from the training files (their cached features when given, (N, D) in data.of("train")
    order); returns what model.json records, or None when --unknown-recall 0 turns the unknown answer off."""
    if not cfg.unknown_recall:
        return None
    y = np.array(data.y("train"))
    if train_features is None:
        picked = fit_subset(y, MAX_FIT_FILES, cfg.seed)
        train_features, y = backbone_features(model, [data.of("train")[i] for i in picked], cfg), y[picked]
    model.open_set = MahalanobisScore.fit(train_features, y, len(data.labels))
    return {"score": "mahalanobis", "target_recall": float(cfg.unknown_recall), "fitted_on_files": int(len(y))}


def fit_subset(y: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of at most n files, the same share of every class (at least 2 each where there are)."""
    if len(y) <= n:
        return np.arange(len(y))
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        k = max(2, round(len(idx) * n / len(y)))
        keep.append(rng.choice(idx, min(k, len(idx)), replace=False))
    return np.sort(np.concatenate(keep))


@torch.inference_mode()
def backbone_features(model: Classifier, samples, cfg: TrainConfig, batch_size: int = 32) -> np.ndarray:
    """(N, D) fp32 features of the trained backbone, eval transform (unreadable files were dropped earlier)."""
    pre = make_preprocessor(model.backbone.spec, augment="none", max_pixels=cfg.max_pixels)
    backbone = model.backbone.eval()
    device = str(next(backbone.parameters()).device)
    out = []
    bar = progress(range(len(samples)), total=len(samples), desc="Features for the unknown score", unit="file")
    for paths, x in decoded_batches([s.path for s in samples], lambda ps: [pre.eval(pre.load(p)) for p in ps],
                                    batch_size):
        out.append(forward_batches(backbone, x, backbone.spec.task, device, bf16=False).numpy())
        bar.update(len(paths))
    bar.close()
    return np.concatenate(out)
