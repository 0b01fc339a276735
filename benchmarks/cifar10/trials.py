"""Short CIFAR-10 trials that chose the network of benchmarks/cifar10/budget.py (plain PyTorch, no classforge
training loop, so that many variants can be tried quickly, two at a time on one thread each).

    python benchmarks/cifar10/trials.py speed --arch air --widths 32,64,112      # training images/s
    python benchmarks/cifar10/trials.py train --arch air --widths 32,64,112 --budget 1200 --threads 1

Architectures (all under 256K parameters with the 10-class head):
  resnet  ResNet-20 shape (3 stages x depth basic blocks, widths e.g. 16,32,60): classforge's cnn_resnet_256k
  air     patch-whitening 2x2 stem, then per stage conv -> max-pool -> BN -> ReLU -> (depth-1) x conv-BN-ReLU,
          global max pool, logits / 9: classforge's cnn_fast_256k (widths 32,64,112, depth 2)
  res9    a narrow ResNet-9 (prep conv, conv+pool+residual pair, conv+pool, conv+pool+residual pair)
Recipe: SGD Nesterov 0.9, weight decay on weights only, one-cycle (15% linear warm-up, linear decay to 0) over a
wall-clock budget, label smoothing, pad-4 crop + flip; test accuracy with and without the flip TTA. Each trial
appends a JSON line to --results. Data: ../shared/datasets/cifar10, decoded once into the cache.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "datasets" / "cifar10"


def load_arrays(cache: Path) -> dict[str, np.ndarray]:
    f = cache / "cifar10-uint8.npz"
    if not f.exists():
        from PIL import Image

        classes = sorted(p.name for p in (DATA / "train").iterdir())
        out = {}
        for split in ("train", "test"):
            xs, ys = [], []
            for i, c in enumerate(classes):
                for p in sorted((DATA / split / c).glob("*.jpg")):
                    xs.append(np.asarray(Image.open(p).convert("RGB")))
                    ys.append(i)
            out[f"x{split}"], out[f"y{split}"] = np.stack(xs), np.array(ys)
        cache.mkdir(parents=True, exist_ok=True)
        np.savez(f, **out)
    d = np.load(f)
    return {k: d[k] for k in d.files}


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        nn.init.zeros_(self.b2.weight)
        self.stride, self.pad = stride, cout - cin

    def forward(self, x):
        o = self.b2(self.c2(F.relu(self.b1(self.c1(x)))))
        sc = x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x
        return F.relu(o + (F.pad(sc, (0, 0, 0, 0, 0, self.pad)) if self.pad else sc))


def resnet(widths, depth):
    layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()]
    cin = widths[0]
    for i, w in enumerate(widths):
        for j in range(depth):
            layers.append(Block(cin, w, 2 if (i > 0 and j == 0) else 1))
            cin = w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10))


class AirNet(nn.Module):
    def __init__(self, widths, depth, whiten_width=24):
        super().__init__()
        self.whiten = nn.Conv2d(3, whiten_width, 2, bias=True)
        groups, cin = [], whiten_width
        for w in widths:
            layers = [nn.Conv2d(cin, w, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(w), nn.ReLU()]
            for _ in range(depth - 1):
                layers += [nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
            groups.append(nn.Sequential(*layers))
            cin = w
        self.groups = nn.Sequential(*groups)
        self.head = nn.Linear(cin, 10, bias=False)

    def forward(self, x):
        x = self.groups(F.relu(self.whiten(x)))
        return self.head(F.adaptive_max_pool2d(x, 1).flatten(1)) / 9

    @torch.no_grad()
    def fit_whitening(self, x, eps=5e-4):
        p = x.unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12).double()
        p = p - p.mean(0)
        ev, vec = torch.linalg.eigh(p.T @ p / len(p))
        filt = (vec.T / torch.sqrt(ev[:, None] + eps)).reshape(12, 3, 2, 2).float()
        self.whiten.weight.copy_(torch.cat([filt, -filt]))
        self.whiten.bias.zero_()
        self.whiten.weight.requires_grad_(False)


class Res9(nn.Module):
    def __init__(self, widths):
        super().__init__()
        c0, c1, c2, c3 = widths

        def cbr(ci, co):
            return [nn.Conv2d(ci, co, 3, padding=1, bias=False), nn.BatchNorm2d(co), nn.ReLU()]

        self.prep = nn.Sequential(*cbr(3, c0))
        self.l1, self.r1 = nn.Sequential(*cbr(c0, c1), nn.MaxPool2d(2)), nn.Sequential(*cbr(c1, c1), *cbr(c1, c1))
        self.l2 = nn.Sequential(*cbr(c1, c2), nn.MaxPool2d(2))
        self.l3, self.r3 = nn.Sequential(*cbr(c2, c3), nn.MaxPool2d(2)), nn.Sequential(*cbr(c3, c3), *cbr(c3, c3))
        self.fc = nn.Linear(c3, 10, bias=False)

    def forward(self, x):
        x = self.l1(self.prep(x))
        x = self.l2(x + self.r1(x))
        x = self.l3(x)
        return self.fc(F.adaptive_max_pool2d(x + self.r3(x), 1).flatten(1)) * 0.125


def build(a) -> nn.Module:
    widths = [int(w) for w in a.widths.split(",")]
    if a.arch == "resnet":
        return resnet(widths, a.depth)
    if a.arch == "air":
        return AirNet(widths, a.depth)
    return Res9(widths)


def crop_flip(x, pad, g):
    b, c, h, w = x.shape
    xp = F.pad(x, (pad,) * 4)
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=g)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=g)
    rows = (oy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w))[:, None, None, :]
    x = xp[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
    return torch.where((torch.rand(b, generator=g) < 0.5)[:, None, None, None], x.flip(3), x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["speed", "train"])
    ap.add_argument("--arch", default="air", choices=["air", "resnet", "res9"])
    ap.add_argument("--widths", default="32,64,112")
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--budget", type=float, default=1200, help="seconds of training")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=0.2)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--label-smoothing", type=float, default=0.2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tag", default="")
    ap.add_argument("--cache", default=os.environ.get("CLASSFORGE_CACHE", str(Path.home() / ".cache" / "classforge")))
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "cifar10_trials.jsonl"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = build(a)
    n_params = sum(p.numel() for p in model.parameters())
    d = load_arrays(Path(a.cache))
    xtr, ytr = torch.from_numpy(d["xtrain"]).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(d["ytrain"]).long()
    xte, yte = torch.from_numpy(d["xtest"]).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(d["ytest"]).long()
    mean, std = xtr.float().mean((0, 2, 3), keepdim=True), xtr.float().std((0, 2, 3), keepdim=True)

    def norm(x):
        return ((x.float() - mean) / std).contiguous(memory_format=torch.channels_last)

    if isinstance(model, AirNet):
        model.fit_whitening(norm(xtr[:5000]))
    model = model.to(memory_format=torch.channels_last)
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": a.weight_decay}, {"params": no_decay, "weight_decay": 0}],
                          lr=a.lr, momentum=0.9, nesterov=True)
    g = torch.Generator().manual_seed(0)
    if a.mode == "speed":
        x, y = norm(xtr[: a.batch_size]), ytr[: a.batch_size]
        for i in range(8):
            if i == 3:
                t = time.perf_counter()
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(json.dumps({"arch": a.arch, "widths": a.widths, "depth": a.depth, "params": n_params, "threads": a.threads,
                          "images_per_s": round(5 * a.batch_size / (time.perf_counter() - t), 1)}))
        return

    def evaluate(tta: bool) -> float:
        model.eval()
        correct = 0
        with torch.no_grad():
            for i in range(0, len(xte), 1000):
                x = norm(xte[i:i + 1000])
                logits = model(x) + (model(x.flip(3)) if tta else 0)
                correct += int((logits.argmax(1) == yte[i:i + 1000]).sum())
        model.train()
        return correct / len(xte)

    t0, seen, epoch, done = time.time(), 0, 0, False
    while not done:
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr) - a.batch_size + 1, a.batch_size):
            p = (time.time() - t0) / a.budget
            if p >= 1:
                done = True
                break
            lr = a.lr * (p / 0.15 if p < 0.15 else max(0.0, (1 - p) / 0.85))
            for group in opt.param_groups:
                group["lr"] = lr
            idx = perm[i:i + a.batch_size]
            loss = F.cross_entropy(model(norm(crop_flip(xtr[idx], 4, g))), ytr[idx], label_smoothing=a.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(idx)
        epoch += 1
        if epoch % 5 == 0 and not done:
            print(f"  epoch {epoch} {time.time() - t0:.0f}s loss {loss.item():.3f} test {evaluate(False):.4f}", flush=True)
    res = {"tag": a.tag, "arch": a.arch, "widths": a.widths, "depth": a.depth, "params": n_params, "budget_s": a.budget,
           "threads": a.threads, "epochs": round(seen / len(xtr), 2), "images_per_s": round(seen / (time.time() - t0), 1),
           "test": evaluate(False), "test_flip_tta": evaluate(True), "lr": a.lr, "label_smoothing": a.label_smoothing,
           "date": time.strftime("%Y-%m-%d %H:%M")}
    print(json.dumps(res), flush=True)
    with open(a.results, "a") as f:
        f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
