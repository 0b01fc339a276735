"""How well the "unknown" answer separates files of no class, and why it is a distance in feature space.

    python benchmarks/open_set.py image ../shared/datasets/hymenoptera \\
        --unknown ../shared/probe/images ../shared/datasets/cifar10/test:200 ../shared/datasets/pokemon_gen1_sprites:200
    python benchmarks/open_set.py audio ../shared/datasets/fsdd \\
        --unknown ../shared/probe/sounds ../shared/datasets/pokemon_gen1_cries:200

Each --unknown source is a folder, optionally `:N` for N of its files drawn at random (seed 0); they are copied
into one temporary folder that `classforge train --unknown-dir` scores. The script prints the run's open_set
figures (AUROC, share of no-class files accepted at the threshold chosen for 95% known recall on validation),
then the same figures for other candidate scores computed from the run's own model on the same files: maximum
softmax probability, energy, maximum logit (scores from the logits), cosine to the nearest class mean, distance to
the 5th nearest training file, and the shipped Mahalanobis distance (scores from the features)."""

from __future__ import annotations

import argparse
import csv
import json
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import classforge
from classforge.data.discover import media_files
from classforge.runtime.predictor import Predictor


def gather_unknown(task: str, sources: list[str], dest: Path) -> int:
    rng = random.Random(0)
    n = 0
    for src in sources:
        folder, _, count = src.partition(":")
        files = sorted(media_files(folder, task))
        if count:
            files = rng.sample(files, min(int(count), len(files)))
        for f in files:
            shutil.copy(f, dest / f"{n:05d}_{f.name}")
            n += 1
    return n


def features(p: Predictor, paths: list) -> np.ndarray:
    out, model = [], p.model.classifier if hasattr(p.model, "classifier") else p.model
    for i in range(0, len(paths), 32):
        xs = []
        for q in paths[i:i + 32]:
            try:
                xs.append(p.preprocess(q))
            except Exception:  # noqa: BLE001 - unreadable files are left out, as the run does
                continue
        with torch.inference_mode():
            out.append(model.backbone(torch.stack(xs)).float().numpy())
    return np.concatenate(out)


def candidate_scores(model, train_f, train_y, f) -> dict[str, np.ndarray]:
    """Higher = more foreign, for every candidate."""
    w, b = model.head.weight.detach().numpy(), model.head.bias.detach().numpy()
    logits = f @ w.T + b
    z = logits - logits.max(1, keepdims=True)
    lse = logits.max(1) + np.log(np.exp(z).sum(1))
    unit = f / np.linalg.norm(f, axis=1, keepdims=True)
    means = np.stack([train_f[train_y == c].mean(0) for c in np.unique(train_y)])
    unit_means = means / np.linalg.norm(means, axis=1, keepdims=True)
    unit_train = train_f / np.linalg.norm(train_f, axis=1, keepdims=True)
    with torch.inference_mode():
        maha = model.open_set(torch.from_numpy(f)).numpy()
    return {"max softmax probability": -1 / np.exp(z).sum(1), "energy": -lse, "max logit": -logits.max(1),
            "cosine to nearest class mean": -(unit @ unit_means.T).max(1),
            "5th nearest training file (cosine)": -np.sort(unit @ unit_train.T, 1)[:, -5],
            "Mahalanobis, shared Ledoit-Wolf covariance (shipped)": maha}


def compare(run: Path, unknown_dir: Path, recall: float) -> list[dict]:
    from sklearn.metrics import roc_auc_score

    p = Predictor.from_run(run, backend="torch")
    model = p.model.classifier
    labels = p.labels
    root = Path(json.loads((run / "summary.json").read_text())["data"])
    with open(run / "split.csv") as f:
        rows = list(csv.DictReader(f))
    split = {s: [r for r in rows if r["split"] == s] for s in ("train", "val", "test")}
    feats = {s: features(p, [root / r["path"] for r in rs]) for s, rs in split.items()}
    train_y = np.array([labels.index(r["label"]) for r in split["train"]])
    foreign = features(p, sorted(unknown_dir.iterdir()))
    out = []
    scored = {s: candidate_scores(model, feats["train"], train_y, feats[s]) for s in ("val", "test")}
    scored["unknown"] = candidate_scores(model, feats["train"], train_y, foreign)
    for name in scored["val"]:
        threshold = np.quantile(scored["val"][name], recall, method="higher")
        known, none = scored["test"][name], scored["unknown"][name]
        auroc = roc_auc_score(np.r_[np.zeros(len(known)), np.ones(len(none))], np.r_[known, none])
        out.append({"score": name, "auroc": round(float(auroc), 3),
                    "false_accept": round(float(np.mean(none <= threshold)), 3),
                    "test_known_recall": round(float(np.mean(known <= threshold)), 3)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("task", choices=("image", "audio"))
    ap.add_argument("data")
    ap.add_argument("--unknown", nargs="+", required=True, help="folders of no class, each optionally :N")
    ap.add_argument("--recall", type=float, default=0.95)
    ap.add_argument("--out", type=Path, help="write a Markdown table here too")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        unknown = Path(tmp) / "unknown"
        unknown.mkdir()
        n = gather_unknown(args.task, args.unknown, unknown)
        t = time.time()
        run = classforge.train(args.data, Path(tmp) / "run", unknown_dir=str(unknown), unknown_recall=args.recall)
        took = time.time() - t
        s = json.loads((run / "summary.json").read_text())
        o = s["open_set"]
        print(json.dumps({"data": args.data, "unknown_files": n, "seconds": round(took, 1), "test_accuracy":
                          s["test"]["accuracy"], **o}, indent=2))
        rows = compare(run, unknown, args.recall)
    for r in rows:
        print(json.dumps(r))
    if args.out:
        lines = [f"Run: `classforge train {args.data} --unknown-dir <{n} files>` in {took:.1f} s, test accuracy "
                 f"{s['test']['accuracy']:.3f}; open_set: threshold {o['threshold']:.3f}, validation known recall "
                 f"{o['val_known_recall']:.3f}, test known recall {o['test_known_recall']:.3f}, AUROC "
                 f"{o['auroc']:.3f}, false accept {o['false_accept']:.3f}.", "",
                 "| score | AUROC | no-class files accepted | known test files kept |", "|---|---:|---:|---:|"]
        lines += [f"| {r['score']} | {r['auroc']:.3f} | {r['false_accept']:.3f} | {r['test_known_recall']:.3f} |"
                  for r in rows]
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
