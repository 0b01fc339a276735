"""`classforge suggest RUN UNLABELLED --n 50`: which files to label next.

Every unlabelled file goes through the run's backbone once (the embedding cache keeps it) and its head. A file is
worth labelling when the run is unsure of it (a small margin between its two most probable classes) and when it
is unlike what is already labelled or already picked: files are picked one at a time, each time the one with the
largest uncertainty x distance to its nearest labelled-or-picked file (k-center greedy, Sener & Savarese 2018,
weighted by uncertainty). Uncertainty alone picks clumps of near-identical hard files; distance alone picks
outliers the run is sure about. A file that is a copy or a near copy of a labelled file (the same test as the
split's: same bytes, or for images perceptual hashes within --near-dup-distance bits) is never suggested."""

from __future__ import annotations

import csv
import html
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from classforge.core.config import TrainConfig
from classforge.core.errors import ClassforgeError
from classforge.core.files import open_csv, write_text_for_browser
from classforge.data.discover import Dataset, Sample, media_files
from classforge.data.preprocess import make_preprocessor
from classforge.data.validate import duplicate_groups, file_sha1, validate
from classforge.evaluation.report import media_tag
from classforge.runtime import embeddings as emb
from classforge.runtime.engines import engine_for
from classforge.runtime.predictor import load_run_model, softmax
from classforge.training.flow import backbone_kwargs
from classforge.training.update import read_splits, reuse_backbone


@dataclass
class Pick:
    sample: Sample
    predicted: str
    probability: float
    margin: float
    distance: float  # to the nearest labelled-or-picked file when picked (cosine distance)


def suggest_files(run_dir: str | Path, unlabelled: str | Path, n: int = 50, out: str | Path | None = None,
                  data: str | None = None) -> dict:
    """Write OUT/suggestions.csv and OUT/suggestions.html (default OUT: RUN/suggestions); return the summary."""
    run = Path(run_dir)
    if n < 1:
        raise ClassforgeError("--n must be at least 1")
    model, meta, labels = load_run_model(run)
    cfg = TrainConfig.load(run / "config.yaml")
    cfg = cfg.replace(data=data) if data else cfg
    reuse_backbone(model, meta, cfg, run)
    pool, skipped, info = readable(unlabelled, meta["task"], cfg)
    labelled, info_lab = labelled_train_files(run, cfg, meta["task"])
    info.update(info_lab)
    copies = near_copies(pool, labelled, info, cfg.near_dup_distance)
    feats_pool, feats_lab = embed(model, cfg, pool, info), embed(model, cfg, labelled, info)
    with torch.inference_mode():
        logits = model.head(torch.from_numpy(feats_pool)).numpy()
    probs = softmax(logits / np.float32(meta.get("temperature", 1.0)))
    top2 = np.sort(probs, 1)[:, -2:] if probs.shape[1] > 1 else np.c_[np.zeros(len(probs)), probs]
    margin = top2[:, 1] - top2[:, 0]
    order, dist = pick(feats_pool, feats_lab, 1 - margin, n, exclude=set(copies))
    picks = [Pick(pool[i], labels[int(probs[i].argmax())], float(probs[i].max()), float(margin[i]), float(d))
             for i, d in zip(order, dist)]
    out = Path(out) if out else run / "suggestions"
    out.mkdir(parents=True, exist_ok=True)
    write_suggestions_csv(out / "suggestions.csv", picks)
    skipped += [(pool[i].rel, reason) for i, reason in copies.items()]
    summary = {"run": str(run), "unlabelled": str(unlabelled), "files": len(pool), "suggested": len(picks),
               "labelled_train_files": len(labelled), "near_copies_skipped": len(copies),
               "unreadable": len(skipped) - len(copies), "out": str(out)}
    (out / "suggestions.json").write_text(json.dumps(summary, indent=2))
    write_suggestions_html(out / "suggestions.html", summary, picks, skipped, meta["task"])
    return summary


def readable(folder: str | Path, task: str, cfg: TrainConfig):
    """The unlabelled files that decode, (file, reason) for those that do not, and what validation found."""
    root = Path(folder)
    files = media_files(root, task)
    if not files:
        raise ClassforgeError(f"{folder} holds no {task} files to suggest from")
    return checked_samples(root, task, [str(f.relative_to(root)) for f in files], cfg)


def checked_samples(root: Path, task: str, rels: list[str], cfg: TrainConfig):
    ds = Dataset(str(root), task, [Sample(str(root / r), r, "") for r in rels], "unlabelled")
    checked = validate(ds, cfg.min_size, cfg.max_pixels)
    return checked.good, list(checked.skipped), checked.info


def labelled_train_files(run: Path, cfg: TrainConfig, task: str) -> tuple[list[Sample], dict]:
    """The run's training files, found under its data folder (none when it is not on this machine: the
    diversity then counts only the files picked), and what validation found."""
    root = Path(cfg.data) if cfg.data else None
    if root is None or not root.is_dir():
        return [], {}
    rels = [rel for rel, sp in read_splits(run / "split.csv").items() if sp == "train" and (root / rel).is_file()]
    good, _, info = checked_samples(root, task, rels, cfg)
    return good, info


def embed(model, cfg: TrainConfig, samples: list[Sample], info: dict | None = None) -> np.ndarray:
    """(N, D) clean-view embeddings through the run's backbone, from the cache where they are."""
    bb = model.backbone
    if not samples:
        return np.zeros((0, bb.feature_dim), np.float32)
    engine = engine_for(cfg.extract_engine)
    arch = json.dumps(backbone_kwargs(cfg, 0))  # as the run's own embeddings were keyed
    key = emb.features_key(cfg.backbone, bb, arch, engine)
    pre = make_preprocessor(bb.spec, augment="light", max_pixels=cfg.max_pixels)
    sha = [info[s.path].sha1 if info else file_sha1(s.path) for s in samples]
    feats, _ = emb.extract(bb, samples, sha, pre, key, 1, cfg.batch_size, desc="Embedding", engine=engine)
    return feats[:, 0]


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def near_copies(pool: list[Sample], labelled: list[Sample], info: dict, max_distance: int) -> dict[int, str]:
    """Pool files that are a labelled file again: pool index -> reason."""
    both = labelled + pool
    out = {}
    for cluster in duplicate_groups(both, info, max_distance):
        anchor = next((i for i in cluster if i < len(labelled)), None)
        if anchor is None:
            continue
        for i in cluster:
            if i >= len(labelled):
                out[i - len(labelled)] = f"a copy or near copy of labelled {labelled[anchor].rel}"
    return out


def pick(feats_pool: np.ndarray, feats_lab: np.ndarray, uncertainty: np.ndarray, n: int,
         exclude: set[int] = frozenset()) -> tuple[list[int], list[float]]:
    """Greedy: n pool indices, each maximising uncertainty x cosine distance to the nearest labelled-or-picked
    file; returns them with that distance when picked."""
    x = unit(feats_pool.astype(np.float32))
    if len(feats_lab):
        nearest = 1 - (x @ unit(feats_lab.astype(np.float32)).T).max(1)
    else:
        nearest = np.ones(len(x), np.float32)
    value = np.asarray(uncertainty, np.float32)
    taken = np.zeros(len(x), bool)
    taken[list(exclude)] = True
    picked, dist = [], []
    for _ in range(min(n, int((~taken).sum()))):
        score = value * np.maximum(nearest, 0)
        score[taken] = -np.inf
        i = int(np.argmax(score))
        picked.append(i)
        dist.append(float(nearest[i]))
        nearest = np.minimum(nearest, 1 - x @ x[i])
        taken[i] = True
    return picked, dist


def write_suggestions_csv(path: Path, picks: list[Pick]) -> None:
    with open_csv(path, "w") as f:
        w = csv.writer(f)
        w.writerow(["rank", "path", "predicted", "probability", "margin", "distance", "label"])
        for k, p in enumerate(picks, 1):
            w.writerow([k, p.sample.path, p.predicted, f"{p.probability:.4f}", f"{p.margin:.4f}",
                        f"{p.distance:.4f}", ""])


def write_suggestions_html(path: Path, summary: dict, picks: list[Pick], skipped, task: str) -> None:
    cards = "".join(
        f'<div>{media_tag(p.sample.path, task)}<br><b>#{k}</b> {html.escape(p.sample.rel)}<br>'
        f'<span class="sub">looks like {html.escape(p.predicted)} ({p.probability:.2f}), margin {p.margin:.2f}, '
        f'distance {p.distance:.2f}</span></div>' for k, p in enumerate(picks, 1))
    rows = "".join(f"<tr><td>{html.escape(r)}</td><td>{html.escape(why)}</td></tr>" for r, why in skipped)
    doc = f"""<!doctype html><html><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>classforge: what to label next</title>
<style>body{{font-family:system-ui,sans-serif;margin:1.5rem;max-width:1200px}}
.gal{{display:grid;grid-template-columns:repeat(auto-fill,minmax(180px,1fr));gap:12px}}
.gal img{{max-width:100%;image-rendering:auto}}.sub{{color:#666;font-size:.85em}}
table{{border-collapse:collapse}}td{{border-bottom:1px solid #ddd;padding:3px 8px}}</style></head><body>
<h1>What to label next</h1>
<p class="sub">{summary['suggested']} of {summary['files']} unlabelled files in {html.escape(summary['unlabelled'])},
most useful first: those the run is least sure of (small margin between its two best classes) and least like the
{summary['labelled_train_files']} labelled training files and the files picked before them. Label them (the
<code>label</code> column of suggestions.csv, or move the files into class folders), then
<code>classforge update</code>.</p>
<div class="gal">{cards}</div>
<h2>Not suggested ({len(skipped)})</h2>{f'<table>{rows}</table>' if rows else '<p>None.</p>'}
</body></html>"""
    write_text_for_browser(path, doc)
