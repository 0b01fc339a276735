"""Fit a whole network with Lightning: fine-tune, second stage of two-stage, or from scratch."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch.utils.data import DataLoader, WeightedRandomSampler

from classforge.config import TrainConfig
from classforge.data.preprocess import make_preprocessor
from classforge.models.registry import Classifier
from classforge.training.module import ClassifierModule, FileDataset
from classforge.training.trainer import make_trainer


def lr_groups(model: Classifier, stage: str, lr: float, mult: float) -> list[tuple[list, float]]:
    """Input -> output groups. finetune: backbone at lr*mult. two-stage: discriminative, early blocks
    10x lower than late ones (fastai's recipe). scratch: one LR for everything."""
    head = list(model.head.parameters())
    if stage == "scratch":
        return [(list(model.backbone.parameters()), lr), (head, lr)]
    groups = model.backbone.param_groups()
    if stage == "finetune" or len(groups) == 1:
        return [(list(model.backbone.parameters()), lr * mult), (head, lr)]
    n = len(groups)
    return [(g, lr * mult * 10 ** ((i - (n - 1)) / (n - 1))) for i, g in enumerate(groups)] + [(head, lr)]


def _sampler(labels: list[int], cfg: TrainConfig, n_classes: int):
    if not cfg.balance or cfg.balance == "weights":
        return None
    counts = torch.bincount(torch.tensor(labels), minlength=n_classes).float()
    w = (1.0 / counts.clamp(min=1))[torch.tensor(labels)]
    if cfg.balance == "oversample":
        n = len(labels)
    else:  # "augment-to N": every class drawn N times per epoch, each draw freshly augmented
        n = int(cfg.balance.replace("=", " ").split()[-1]) * n_classes
    return WeightedRandomSampler(w, num_samples=n, replacement=True,
                                 generator=torch.Generator().manual_seed(cfg.seed))


def fit_lightning(model: Classifier, data, cfg: TrainConfig, run: Path, stage: str, extra: dict) -> list[dict]:
    from classforge.training.run import DEFAULT_EPOCHS, DEFAULT_LR, class_weights, load_raws

    spec = model.backbone.spec
    pre = make_preprocessor(spec, augment=cfg.augment, max_pixels=cfg.max_pixels)
    tr, va = data.of("train"), data.of("val")
    ytr, yva = data.y("train"), data.y("val")
    train_ds = FileDataset(load_raws(tr, pre, "Decoding train"), ytr, pre, train=True)
    val_ds = FileDataset(load_raws(va, pre, "Decoding val"), yva, pre, train=False) if va else None
    sampler = _sampler(ytr, cfg, len(data.labels))
    bs = min(cfg.batch_size, len(train_ds))
    train_dl = DataLoader(train_ds, batch_size=bs, shuffle=sampler is None, sampler=sampler, drop_last=len(train_ds) > bs,
                          num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0,
                          generator=torch.Generator().manual_seed(cfg.seed))
    val_dl = DataLoader(val_ds, batch_size=max(bs, 64), num_workers=cfg.num_workers,
                        persistent_workers=cfg.num_workers > 0) if val_ds else None
    epochs = cfg.epochs or DEFAULT_EPOCHS[stage]
    lr = DEFAULT_LR[stage] if cfg.lr in ("default", "auto") else float(cfg.lr)
    for p in model.parameters():
        p.requires_grad_(True)
    if cfg.grad_checkpointing:
        model.backbone.set_grad_checkpointing(True)
    steps = epochs * max(1, math.ceil(len(train_dl) / _world(cfg)))
    module = ClassifierModule(model, lr_groups(model, stage, lr, cfg.backbone_lr_mult), cfg.weight_decay,
                              total_steps=steps, warmup_steps=int(cfg.warmup_epochs * len(train_dl)),
                              class_weights=class_weights(data, cfg) if cfg.balance == "weights" else None,
                              label_smoothing=cfg.label_smoothing, channels_last=spec.task == "image")
    monitor = "val_loss" if val_dl else "train_loss"
    trainer, hist = make_trainer(cfg, run, stage, epochs, monitor)
    if cfg.lr == "auto":
        tune_lr(trainer, module, train_dl, val_dl, run)
    ckpt = run / "checkpoints" / "last.ckpt"
    rows = []
    if val_dl is not None and not (cfg.resume and ckpt.exists()):
        rows.append(pre_training_eval(trainer, module, val_dl, stage))
    trainer.fit(module, train_dl, val_dl, ckpt_path=str(ckpt) if cfg.resume and ckpt.exists() else None)
    model.backbone.set_grad_checkpointing(False)
    extra["trainer"] = {"world_size": trainer.world_size, "strategy": type(trainer.strategy).__name__,
                        "accelerator": type(trainer.accelerator).__name__, "precision": str(trainer.precision),
                        "epochs_run": trainer.current_epoch, "stopped_by": stop_reason(trainer)}
    return rows + hist.rows


def stop_reason(trainer) -> str:
    from lightning.pytorch.callbacks import EarlyStopping, Timer

    for cb in trainer.callbacks:
        if isinstance(cb, EarlyStopping) and cb.stopped_epoch:
            return "early stopping"
        if isinstance(cb, Timer) and cb.time_remaining() is not None and cb.time_remaining() <= 0:
            return "time budget"
    return "max epochs"


def _world(cfg: TrainConfig) -> int:
    d = str(cfg.devices)
    return int(d) * cfg.num_nodes if d.isdigit() else 1


def pre_training_eval(trainer, module, val_dl, stage: str) -> dict:
    """Validation before the first epoch: the starting point of the curves."""
    res = trainer.validate(module, val_dl, verbose=False)
    m = res[0] if res else {}
    return {"stage": stage, "epoch": 0, "val_loss": m.get("val_loss"), "val_acc": m.get("val_acc")}


def tune_lr(trainer, module, train_dl, val_dl, run: Path) -> None:
    from lightning.pytorch.tuner import Tuner

    finder = Tuner(trainer).lr_find(module, train_dl, val_dl, min_lr=1e-6, max_lr=1e-1,
                                    num_training=min(100, 3 * len(train_dl)))
    if finder is None:
        return
    fig = finder.plot(suggest=True)
    fig.savefig(run / "lr_finder.png", dpi=100)
    suggestion = finder.suggestion()
    if suggestion:
        module.lr = float(suggestion)
        print(f"  learning-rate finder suggests {suggestion:.2e} (plot: {run / 'lr_finder.png'})")
