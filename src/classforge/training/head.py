"""Train the linear head on cached embeddings (no backbone in the loop: milliseconds per epoch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from classforge.config import TrainConfig
from classforge.training.module import ClassifierModule
from classforge.training.trainer import make_trainer


def fit_head(head: torch.nn.Linear, xtr: np.ndarray, ytr: np.ndarray, xva: np.ndarray, yva: np.ndarray,
             cfg: TrainConfig, run: Path, class_weights: torch.Tensor | None = None) -> list[dict]:
    from classforge.training.run import DEFAULT_EPOCHS, DEFAULT_LR

    # Standardise the features (embeddings come at very different scales per backbone), train on that, then
    # fold the scaling into the Linear layer so the saved model still maps raw backbone features to logits.
    mu = xtr.mean(axis=0)
    sigma = xtr.std(axis=0) + 1e-6
    xtr, xva = (xtr - mu) / sigma, (xva - mu) / sigma if len(xva) else xva
    epochs = cfg.epochs if cfg.epochs and cfg.strategy == "linear" else DEFAULT_EPOCHS["linear"]
    lr = DEFAULT_LR["linear"] if cfg.strategy != "linear" or cfg.lr in ("default", "auto") else float(cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed)
    bs = max(16, min(256, len(xtr) // 8 or 16))
    train_dl = DataLoader(TensorDataset(torch.from_numpy(xtr).float(), torch.from_numpy(ytr).long()),
                          batch_size=bs, shuffle=True, generator=g)
    has_val = len(xva) > 0
    val_dl = DataLoader(TensorDataset(torch.from_numpy(xva).float(), torch.from_numpy(yva).long()),
                        batch_size=1024) if has_val else None
    steps = epochs * len(train_dl)
    module = ClassifierModule(head, [(list(head.parameters()), lr)], weight_decay=1e-3, total_steps=steps,
                              warmup_steps=0, class_weights=class_weights, label_smoothing=cfg.label_smoothing)
    trainer, hist = make_trainer(cfg.replace(patience=max(cfg.patience, 10)), run, "head", epochs,
                                 "val_loss" if has_val else "train_loss", distributed=False, checkpoints=False,
                                 precision="32-true", max_time_s=None)
    trainer.fit(module, train_dl, val_dl)
    with torch.no_grad():
        w = head.weight / torch.from_numpy(sigma).float()
        head.bias -= w @ torch.from_numpy(mu).float()
        head.weight.copy_(w)
    return hist.rows
