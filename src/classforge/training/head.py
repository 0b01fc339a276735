"""Train the linear head on cached embeddings: no backbone in the loop, so an epoch takes milliseconds.

A plain PyTorch loop on purpose: on tensors this small, a Lightning Trainer's per-step overhead (hooks,
logging, progress) dominates (measured ~0.2 s/step on a loaded 2-core CPU). Same recipe as the Lightning
path: AdamW, cosine schedule, early stopping on validation loss, best weights restored, one history row
per epoch.

The optimiser is a few lines of AdamW (`HeadAdamW`) rather than torch.optim's: any torch.optim optimiser imports
torch._dynamo on first use, seconds of start-up that the linear path otherwise never pays."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from classforge.core.config import DEFAULT_EPOCHS, DEFAULT_LR, TrainConfig


def fit_head(head: torch.nn.Linear, xtr: np.ndarray, ytr: np.ndarray, xva: np.ndarray, yva: np.ndarray,
             cfg: TrainConfig, run: Path, class_weights: torch.Tensor | None = None,
             warm_start: bool = False, frozen_rows: int = 0) -> list[dict]:
    """Train `head` on (N, D) features; warm_start begins from its current weights (`classforge update`) instead
    of a fresh initialisation, and the first `frozen_rows` classes' weights then stay exactly as they were."""
    # Standardise the features (embeddings come at very different scales per backbone), train on that, then
    # fold the scaling into the Linear layer so the saved model still maps raw backbone features to logits.
    mu = xtr.mean(axis=0)
    std = xtr.std(axis=0)
    # Floor the scale: a feature (nearly) constant on the training set must not be blown up by 1/std, or its
    # folded weight explodes the logits on test files where that feature does vary.
    floor = 0.1 * float(np.median(std)) if float(np.median(std)) > 0 else 1.0
    sigma = np.maximum(std, floor).astype(np.float32)
    xt = torch.from_numpy((xtr - mu) / sigma).float()
    yt = torch.from_numpy(np.asarray(ytr)).long()
    has_val = len(xva) > 0
    xv = torch.from_numpy((xva - mu) / sigma).float() if has_val else None
    yv = torch.from_numpy(np.asarray(yva)).long() if has_val else None
    epochs = cfg.epochs if cfg.epochs and cfg.strategy == "linear" else DEFAULT_EPOCHS["linear"]
    lr = DEFAULT_LR["linear"] if cfg.strategy != "linear" or cfg.lr in ("default", "auto") else float(cfg.lr)
    bs = max(16, min(256, len(xt) // 8 or 16))
    steps_per_epoch = math.ceil(len(xt) / bs)
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    kept = (head.weight[:frozen_rows].detach().clone(), head.bias[:frozen_rows].detach().clone())
    if warm_start:  # the current weights act on raw features: the same map on the standardised ones
        with torch.no_grad():
            head.bias += head.weight @ torch.from_numpy(mu).float()
            head.weight.mul_(torch.from_numpy(sigma))
        hooks = [p.register_hook(lambda g: torch.cat([torch.zeros_like(g[:frozen_rows]), g[frozen_rows:]]))
                 for p in (head.weight, head.bias)] if frozen_rows else []
    else:
        head.reset_parameters()
        hooks = []
    opt = HeadAdamW(list(head.parameters()), lr=lr, weight_decay=1e-3, total_steps=epochs * steps_per_epoch)
    patience = max(cfg.patience, 10)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread avoids OpenMP hand-offs that stall on a busy CPU
    try:
        rows = _loop(head, xt, yt, xv, yv, epochs, bs, opt, g, class_weights, cfg, patience)
    finally:
        torch.set_num_threads(threads)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        w = head.weight / torch.from_numpy(sigma).float()
        head.bias -= w @ torch.from_numpy(mu).float()
        head.weight.copy_(w)
        head.weight[:frozen_rows], head.bias[:frozen_rows] = kept  # weight decay must not have moved them
    return rows


class HeadAdamW:
    """AdamW (decoupled weight decay, bias-corrected moments) with a cosine learning rate over `total_steps`:
    the same update as torch.optim.AdamW with LambdaLR, for the few tensors of a head."""

    def __init__(self, params: list[torch.Tensor], lr: float, weight_decay: float, total_steps: int,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.params, self.base_lr, self.wd, self.total = params, lr, weight_decay, max(1, total_steps)
        self.b1, self.b2, self.eps = betas[0], betas[1], eps
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0  # steps taken
        self.lr = lr

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """One update at the current rate, then the rate for the next step (cosine from lr to 0)."""
        self.t += 1
        c1, c2 = 1 - self.b1 ** self.t, 1 - self.b2 ** self.t
        for p, m, v in zip(self.params, self.m, self.v):
            if p.grad is None:
                continue
            p.mul_(1 - self.lr * self.wd)
            m.lerp_(p.grad, 1 - self.b1)
            v.mul_(self.b2).addcmul_(p.grad, p.grad, value=1 - self.b2)
            p.addcdiv_(m, (v.sqrt() / math.sqrt(c2)).add_(self.eps), value=-self.lr / c1)
        self.lr = self.base_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, self.t / self.total)))


def _loop(head, xt, yt, xv, yv, epochs, bs, opt, g, class_weights, cfg, patience) -> list[dict]:
    has_val = xv is not None
    best, best_state, bad, rows = float("inf"), None, 0, []
    for epoch in range(1, epochs + 1):
        t = time.time()
        head.train()
        perm = torch.randperm(len(xt), generator=g)
        tot_loss = tot_correct = 0.0
        for i in range(0, len(xt), bs):
            idx = perm[i:i + bs]
            logits = head(xt[idx])
            loss = F.cross_entropy(logits, yt[idx], weight=class_weights, label_smoothing=cfg.label_smoothing)
            opt.zero_grad()
            loss.backward()
            opt.step()
            tot_loss += float(loss.detach()) * len(idx)
            tot_correct += float((logits.argmax(1) == yt[idx]).sum())
        row = {"stage": "head", "epoch": epoch, "train_loss": tot_loss / len(xt), "train_acc": tot_correct / len(xt),
               "lr": opt.lr}
        head.eval()
        if has_val:
            with torch.no_grad():
                lv = head(xv)
                row.update(val_loss=float(F.cross_entropy(lv, yv)), val_acc=float((lv.argmax(1) == yv).float().mean()))
        row["epoch_time_s"] = round(time.time() - t, 4)
        rows.append(row)
        monitored = row["val_loss"] if has_val else row["train_loss"]
        if monitored < best - 1e-5:
            best, bad = monitored, 0
            best_state = {k: v.clone() for k, v in head.state_dict().items()}
        else:
            bad += 1
            if bad >= patience:
                break
    if best_state is not None:
        head.load_state_dict(best_state)
    return rows
