"""Paired ablations of the CIFAR-10 budget recipe on classforge's own SmallCNN, without Lightning, so that two
variants can run side by side (one thread each) on exactly the same data, split and clock.

    python benchmarks/cifar10/ablate.py --budget 840 --threads 1 --ema 0.995            # baseline + its EMA
    python benchmarks/cifar10/ablate.py --budget 840 --threads 1 --ema 0.995 --altflip  # alternating flips
    python benchmarks/cifar10/ablate.py --arch cnn_fast_256k --set 'block="pooled,pooled,plain"'
    python benchmarks/cifar10/ablate.py --budget 840 --threads 1 --cutout 8                 # cutout
    python benchmarks/cifar10/ablate.py --budget 3000 --threads 1 --train-subset 10000 --cutout 8  # over-fitted regime

The recipe is benchmarks/cifar10/budget.py's: SGD Nesterov 0.9, weight decay on weights only, one-cycle over the
wall-clock budget (schedules.onecycle_factor), label smoothing 0.2, batch 256, pad-4 crop + flip, the
patch-whitening stem fitted on 2,000 training images. Validation is a stratified 5% of train/ (2,500 images);
the official test/ is scored once at the end. At the end every model is scored on val and test with each
test-time augmentation mode; with --ema the weight average is scored too (the same run, so the comparison is
paired). `--altflip` replaces the random flip by airbench's alternating flip (each image mirrored on every
other epoch). Appends one JSON line per run to --results.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from trials import load_arrays  # the sibling script's decoder and cache

from classforge.models.registry import Classifier
from classforge.models.small_cnn import CIFAR10_MEAN, CIFAR10_STD, PRESETS, TTA_MODES, SmallCNN
from classforge.training.module import batch_crop_flip, batch_cutout
from classforge.training.schedules import onecycle_factor

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="cnn_fast_256k", choices=sorted(PRESETS))
    ap.add_argument("--set", action="append", default=[], help="SmallCNN argument key=JSON value (repeatable)")
    ap.add_argument("--budget", type=float, default=600, help="seconds of training")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=0.2)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--label-smoothing", type=float, default=0.2)
    ap.add_argument("--pad", type=int, default=4)
    ap.add_argument("--cutout", type=int, default=0, help="side of the cutout square (0: off), as --cutout of train")
    ap.add_argument("--ema", type=float, default=0.0, help="also keep and score an EMA of the weights")
    ap.add_argument("--altflip", action="store_true")
    ap.add_argument("--train-subset", type=int, default=0,
                    help="train on a stratified N of the training split (0: all): an over-fitted regime in little time")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="")
    ap.add_argument("--cache", default=os.environ.get("CLASSFORGE_CACHE", str(Path.home() / ".cache" / "classforge")))
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "cifar10_ablate.jsonl"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)

    d = load_arrays(Path(a.cache))  # (N, 32, 32, 3) uint8, decoded once into the cache
    x_all = torch.from_numpy(d["xtrain"]).permute(0, 3, 1, 2).contiguous()
    y_all = torch.from_numpy(d["ytrain"]).long()
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y_all), generator=g)
    vi = torch.cat([perm[y_all[perm] == c][:250] for c in range(10)])  # stratified 5%: 250 per class
    keep = torch.ones(len(y_all), dtype=torch.bool)
    keep[vi] = False
    xtr, ytr, xva, yva = x_all[keep], y_all[keep], x_all[vi], y_all[vi]
    if a.train_subset:  # the same images whatever the other options (a generator of its own, seed 1)
        sub = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(1))
        sub = torch.cat([sub[ytr[sub] == c][:a.train_subset // 10] for c in range(10)])
        xtr, ytr = xtr[sub], ytr[sub]
    xte = torch.from_numpy(d["xtest"]).permute(0, 3, 1, 2).contiguous()
    yte = torch.from_numpy(d["ytest"]).long()
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1) * 255
    inv_std = 1 / (torch.tensor(CIFAR10_STD).view(1, 3, 1, 1) * 255)

    def norm(u: torch.Tensor) -> torch.Tensor:
        return ((u.float() - mean) * inv_std).contiguous(memory_format=torch.channels_last)

    cfg = dict(PRESETS[a.arch])
    for kv in a.set:
        k, v = kv.split("=", 1)
        cfg[k] = json.loads(v)
    bb = SmallCNN(**cfg)
    model = Classifier(bb, 10)
    n_params = sum(p.numel() for p in model.parameters())
    bb.init_from_data(norm(xtr[torch.randperm(len(xtr), generator=g)[:2000]]).contiguous())
    model = model.to(memory_format=torch.channels_last)
    params = list(model.parameters())
    opt = torch.optim.SGD([{"params": [p for p in params if p.ndim > 1]},
                           {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}],
                          lr=a.lr, momentum=0.9, nesterov=True, weight_decay=a.weight_decay)
    ema = copy.deepcopy(model) if a.ema else None

    def accuracy(m, x, y, tta: str) -> float:
        m.eval()
        m.backbone.tta = tta
        with torch.no_grad():
            c = sum(int((m(norm(x[i:i + 500])).argmax(1) == y[i:i + 500]).sum()) for i in range(0, len(x), 500))
        m.backbone.tta = "none"
        return c / len(x)

    gen = torch.Generator().manual_seed(a.seed)
    t0, step, epoch, hist, done = time.time(), 0, 0, [], False
    while not done:
        epoch += 1
        model.train()
        order = torch.randperm(len(xtr), generator=gen)
        seen, correct, loss_sum, te = 0, 0, 0.0, time.time()
        for i in range(0, len(order) - a.batch_size + 1, a.batch_size):
            prog = (time.time() - t0) / a.budget
            if prog >= 1:
                done = True
                break
            for group in opt.param_groups:
                group["lr"] = a.lr * onecycle_factor(prog)
            b = order[i:i + a.batch_size]
            if a.altflip:  # every image mirrored on alternate epochs, half of them starting mirrored
                xb = batch_crop_flip(xtr[b], a.pad, False, gen)
                xb = torch.where(((b % 2) == (epoch % 2))[:, None, None, None], xb.flip(3), xb)
            else:
                xb = batch_crop_flip(xtr[b], a.pad, True, gen)
            xb = norm(xb)
            if a.cutout:
                xb = batch_cutout(xb, a.cutout, gen)
            out = model(xb)
            loss = F.cross_entropy(out, ytr[b], label_smoothing=a.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            seen += len(b)
            loss_sum += float(loss) * len(b)
            correct += int((out.argmax(1) == ytr[b]).sum())
            if ema is not None:  # the same update as classforge's EMAWeights (--ema)
                dk = min(a.ema, (1 + step) / (10 + step))
                with torch.no_grad():
                    for e, w in zip(ema.state_dict().values(), model.state_dict().values()):
                        e.lerp_(w, 1 - dk) if e.dtype.is_floating_point else e.copy_(w)
        if seen:
            hist.append({"epoch": epoch, "train_loss": round(loss_sum / seen, 4), "train_acc": round(correct / seen, 4),
                         "val_acc": accuracy(model, xva, yva, "none"), "images_per_s": round(seen / (time.time() - te), 1),
                         "elapsed_s": round(time.time() - t0, 1)})
            print(json.dumps(hist[-1]), flush=True)
    res = {"date": dt.datetime.now().isoformat(timespec="minutes"), "tag": a.tag, "args": vars(a), "net": cfg,
           "params": n_params, "epochs": epoch, "steps": step, "hist": hist}
    for name, m in [("raw", model)] + ([("ema", ema)] if ema is not None else []):
        for tta in TTA_MODES:
            res[f"{name}_val_{tta}"] = accuracy(m, xva, yva, tta)
            res[f"{name}_test_{tta}"] = accuracy(m, xte, yte, tta)
    print(json.dumps({k: v for k, v in res.items() if k != "hist"}), flush=True)
    with open(a.results, "a") as f:
        f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
