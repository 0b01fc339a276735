"""Does labelling what `classforge suggest` picks beat labelling files at random?

    python benchmarks/suggest.py ../shared/datasets/cifar10 --pool 5000 --test 2000 --start 500 --add 500 \\
        --step 100 --seeds 0,1,2 --out benchmarks/results/DATE-suggest.md

A pool of unlabelled training files and a test set are drawn from DATA (train/ and test/ class folders, seeded,
the same share of every class). Each seed starts from `--start` random labelled files; then, `--step` files at a
time up to `--add` more, each method picks files from the rest of the pool, their true labels are revealed and
the linear head is fit again (classforge's own fit_head, on the default backbone's cached embeddings, as a linear
run does). Methods: random; classforge suggest (uncertainty x distance, k-center greedy); and, to show why both
parts are there, margin alone and distance alone. Test accuracy after every step gives the curves."""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from classforge.core.config import TrainConfig
from classforge.data.discover import Sample
from classforge.models.registry import Classifier, create_backbone, default_backbone
from classforge.runtime.predictor import softmax
from classforge.training.head import fit_head
from classforge.training.suggest import embed, pick


def draw(root: Path, per_class: int, rng: np.random.Generator) -> tuple[list[Sample], np.ndarray]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    samples, y = [], []
    for c, name in enumerate(classes):
        files = sorted((root / name).iterdir())
        for f in rng.choice(files, per_class, replace=False):
            samples.append(Sample(str(f), f"{name}/{f.name}", name))
            y.append(c)
    return samples, np.array(y)


def fit(x: np.ndarray, y: np.ndarray, classes: int, cfg: TrainConfig) -> torch.nn.Linear:
    head = torch.nn.Linear(x.shape[1], classes)
    with tempfile.TemporaryDirectory() as tmp:
        fit_head(head, x, y, x[:0], y[:0], cfg, Path(tmp))
    return head


def accuracy(head, x, y) -> float:
    with torch.inference_mode():
        return float((head(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def choose(method: str, head, pool_x, labelled, rest, k, rng) -> list[int]:
    """k indices of `rest` (pool indices not yet labelled)."""
    if method == "random":
        return list(rng.choice(rest, k, replace=False))
    with torch.inference_mode():
        probs = softmax(head(torch.from_numpy(pool_x[rest])).numpy())
    top2 = np.sort(probs, 1)[:, -2:]
    uncertainty = 1 - (top2[:, 1] - top2[:, 0])
    if method == "margin alone":
        return [rest[i] for i in np.argsort(-uncertainty)[:k]]
    weights = np.ones_like(uncertainty) if method == "distance alone" else uncertainty
    idx, _ = pick(pool_x[rest], pool_x[labelled], weights, k)
    return [rest[i] for i in idx]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path)
    ap.add_argument("--pool", type=int, default=5000)
    ap.add_argument("--test", type=int, default=2000)
    ap.add_argument("--start", type=int, default=500)
    ap.add_argument("--add", type=int, default=500)
    ap.add_argument("--step", type=int, default=100)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    classes = len([p for p in (args.data / "train").iterdir() if p.is_dir()])
    pool, pool_y = draw(args.data / "train", args.pool // classes, rng)
    test, test_y = draw(args.data / "test", args.test // classes, rng)
    name = default_backbone("image")
    cfg = TrainConfig(backbone=name, strategy="linear")
    model = Classifier(create_backbone(name), classes)
    t = time.time()
    pool_x, test_x = embed(model, cfg, pool), embed(model, cfg, test)
    print(f"embedded {len(pool) + len(test)} files in {time.time() - t:.0f} s", flush=True)
    methods = ("random", "classforge suggest", "margin alone", "distance alone")
    sizes = list(range(args.start, args.start + args.add + 1, args.step))
    curves = {m: [] for m in methods}
    for seed in (int(s) for s in args.seeds.split(",")):
        start = list(np.random.default_rng(100 + seed).choice(len(pool), args.start, replace=False))
        for m in methods:
            labelled, accs, head = list(start), [], None
            r = np.random.default_rng(200 + seed)
            for size in sizes:
                if size > len(labelled):
                    rest = sorted(set(range(len(pool))) - set(labelled))
                    labelled += choose(m, head, pool_x, labelled, rest, size - len(labelled), r)
                head = fit(pool_x[labelled], pool_y[labelled], classes, cfg.replace(seed=seed))
                accs.append(accuracy(head, test_x, test_y))
            curves[m].append(accs)
            print(json.dumps({"seed": seed, "method": m, "accuracy": [round(a, 4) for a in accs]}), flush=True)
    report(curves, sizes, args)


def report(curves: dict, sizes: list[int], args) -> None:
    mean = {m: np.mean(v, 0) for m, v in curves.items()}
    sd = {m: np.std(v, 0) for m, v in curves.items()}
    head = "| labelled files | " + " | ".join(curves) + " |"
    lines = [head, "|---:|" + "---:|" * len(curves)]
    lines += [f"| {s} | " + " | ".join(f"{mean[m][i]:.4f} ± {sd[m][i]:.4f}" for m in curves) + " |"
              for i, s in enumerate(sizes)]
    print("\n".join(lines))
    if args.out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for m in curves:
            ax.errorbar(sizes, mean[m], yerr=sd[m], marker="o", capsize=3, label=m)
        ax.set_xlabel("labelled files")
        ax.set_ylabel(f"test accuracy ({args.test} files)")
        ax.set_title(f"{args.data.name}: what to label next (mean ± sd, seeds {args.seeds})")
        ax.legend()
        fig.tight_layout()
        png = args.out.with_suffix(".png")
        fig.savefig(png, dpi=100)
        args.out.write_text("\n".join(lines) + f"\n\n![curves]({png.name})\n")


if __name__ == "__main__":
    main()
