"""The data every strategy starts from: discovered, validated and split, with the helpers that read it."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from classforge.core.config import TrainConfig, parse_fractions
from classforge.core.errors import ClassforgeError
from classforge.core.progress import progress
from classforge.data.discover import Dataset, Sample, discover_for
from classforge.data.kept import KeptImages
from classforge.data.precheck import Precheck
from classforge.data.split import SplitReport, make_split, read_split
from classforge.data.validate import Validation, validate


@dataclass
class Prepared:
    """Data after discovery, validation and splitting: what every strategy starts from."""

    ds: Dataset
    checked: Validation
    split: SplitReport
    labels: list[str]
    samples: list[Sample]  # with split set; excluded ones dropped
    notes: list[str] = field(default_factory=list)
    kept: KeptImages | None = None  # images the check decoded, for the first pass over the files
    check_process: Precheck | None = None  # the process that checked the files, which may compute features ahead

    def features_ahead(self, on_progress=None) -> dict | None:
        """The features the check process computed into the embedding cache while the run loaded (runtime.ahead),
        once it is done: {"key", "sha1s", "build_s", "loop_s"}; None when it computed none. `on_progress(done,
        total)` hears of its progress meanwhile."""
        if self.check_process is None:
            return None
        return self.check_process.message("features", on_progress)

    def release_kept(self) -> None:
        """Free the images the first pass did not take (files outside the split, passes that do not decode)."""
        if self.kept is not None:
            self.kept.clear()
            self.kept = None

    def of(self, split: str) -> list[Sample]:
        return [s for s in self.samples if s.split == split]

    def y(self, split: str) -> list[int]:
        idx = {c: i for i, c in enumerate(self.labels)}
        return [idx[s.label] for s in self.of(split)]


def prepare_data(cfg: TrainConfig, keep_decoded: bool = False, precheck: Precheck | None = None) -> Prepared:
    """Discover, check and split. `keep_decoded`: hold the images the check decodes (bounded) for the run's
    first pass over the files, so that a file is decoded once. `precheck`: the check already started in another
    process (data.precheck), with the data it discovered."""
    ds = precheck.ds if precheck is not None else discover_for(cfg)
    kept = KeptImages() if keep_decoded and ds.task == "image" else None
    if precheck is not None:
        precheck.wait(kept)
    checked = validate(ds, cfg.min_size, cfg.max_pixels, keep=kept)
    if not checked.good:
        raise ClassforgeError(f"No usable files in {ds.root}: all {len(ds.samples)} failed validation")
    if cfg.split_file:
        report = read_split(cfg.split_file, checked.good)
    else:
        report = make_split(checked.good, checked.info, parse_fractions(cfg.split), cfg.seed, cfg.test_groups,
                            cfg.near_dup_distance)
    samples = [s for s in checked.good if s.split]
    labels = sorted({s.label for s in samples if s.split == "train"}, key=ds.classes.index)
    notes = list(ds.notes) + list(report.notes)
    unseen = {s.label for s in samples} - set(labels)
    if unseen:
        notes.append(f"classes with no training sample were dropped from evaluation: {sorted(unseen)}")
        samples = [s for s in samples if s.label in set(labels)]
    if len(labels) < 2:
        raise ClassforgeError(f"Need at least 2 classes with training samples, found {labels}")
    return Prepared(ds, checked, report, labels, samples, notes, kept, precheck)


def views_per_class(data: Prepared, cfg: TrainConfig) -> int:
    """--views K, or enough augmented views that the smallest class reaches N (--balance augment-to N)."""
    views = max(1, cfg.views)
    if cfg.balance and cfg.balance.startswith("augment-to"):
        target = int(cfg.balance.split()[-1] if " " in cfg.balance else cfg.balance.split("-")[-1].split("=")[-1])
        counts = np.bincount(data.y("train"), minlength=len(data.labels))
        views = max(views, min(16, math.ceil(target / max(1, counts[counts > 0].min()))))
    return views


def audio_kwargs(cfg: TrainConfig) -> dict:
    if cfg.background_dir:
        return {"background_dir": cfg.background_dir}
    return {}


def class_weights(data: Prepared, cfg: TrainConfig) -> torch.Tensor | None:
    if cfg.balance not in ("weights", "oversample"):
        return None
    counts = np.bincount(data.y("train"), minlength=len(data.labels)).astype(float)
    w = counts.sum() / (len(counts) * np.maximum(counts, 1))
    return torch.tensor(w, dtype=torch.float32)


def load_raws(samples: list[Sample], pre, desc: str) -> list:
    """Decode every file once into memory (shrunk to the model's size), in parallel."""
    with ThreadPoolExecutor(max_workers=2) as ex:
        return list(progress(ex.map(lambda s: pre.load(s.path), samples), total=len(samples), desc=desc))
