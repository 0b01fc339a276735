"""One place that builds Lightning Trainers (devices, precision, callbacks) for every strategy."""

from __future__ import annotations

import copy
import logging
import os
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint

from classforge.config import TrainConfig, parse_duration
from classforge.training.embeddings import fast_cpu_bf16

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*")
warnings.filterwarnings("ignore", ".*GPU available but not used.*")
warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
for _name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda", "lightning.fabric"):
    logging.getLogger(_name).setLevel(logging.WARNING)


# Callbacks added to every Trainer of the runs started while they are listed here: classforge.search puts its
# optuna pruning callback here around one train() call (train() builds its Trainers deep inside a strategy).
RUN_CALLBACKS: list[Callback] = []


class History(Callback):
    """One row per epoch: losses, accuracies, learning rate, wall time."""

    def __init__(self, stage: str):
        self.stage, self.rows, self._t = stage, [], time.time()

    def on_train_epoch_start(self, trainer, pl_module):
        self._t = time.time()

    def on_train_epoch_end(self, trainer, pl_module):
        m = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        lr = trainer.optimizers[0].param_groups[-1]["lr"] if trainer.optimizers else None
        self.rows.append({"stage": self.stage, "epoch": trainer.current_epoch + 1,
                          "train_loss": m.get("train_loss"), "train_acc": m.get("train_acc"),
                          "val_loss": m.get("val_loss"), "val_acc": m.get("val_acc"), "lr": lr,
                          "epoch_time_s": round(time.time() - self._t, 3)})


class BestWeights(Callback):
    """Keep the weights of the best epoch in memory (by the monitored metric) and restore them at the end."""

    def __init__(self, monitor: str):
        self.monitor, self.best, self.state = monitor, float("inf"), None

    def on_train_epoch_end(self, trainer, pl_module):
        v = trainer.callback_metrics.get(self.monitor)
        if v is not None and float(v) < self.best:
            self.best = float(v)
            self.state = copy.deepcopy({k: t.detach().cpu() for k, t in pl_module.model.state_dict().items()})

    def on_fit_end(self, trainer, pl_module):
        if self.state is not None:
            pl_module.model.load_state_dict(self.state)


def resolve_precision(cfg: TrainConfig, accelerator: str) -> str:
    if cfg.precision != "auto":
        return cfg.precision
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if fast_cpu_bf16() else "32-true"


def make_trainer(cfg: TrainConfig, run: Path, stage: str, max_epochs: int, monitor: str, *,
                 distributed: bool = True, checkpoints: bool = True, precision: str | None = None,
                 max_time_s: float | None = None, extra_callbacks: list | None = None):
    hist, best = History(stage), BestWeights(monitor)
    callbacks = [hist, best, EarlyStopping(monitor=monitor, patience=cfg.patience, mode="min")]
    if checkpoints:
        callbacks.append(ModelCheckpoint(dirpath=run / "checkpoints", filename=f"{stage}-best", monitor=monitor,
                                         save_last=True, save_top_k=1, mode="min"))
    callbacks += (extra_callbacks or []) + RUN_CALLBACKS
    budget = max_time_s if max_time_s is not None else parse_duration(cfg.time_budget)
    devices = _devices(cfg.devices) if distributed else 1
    accelerator = cfg.accelerator if distributed else ("cpu" if not torch.cuda.is_available() else cfg.accelerator)
    kw = dict(accelerator=accelerator, devices=devices, max_epochs=max_epochs, callbacks=callbacks,
              precision=precision or resolve_precision(cfg, cfg.accelerator),
              logger=L.pytorch.loggers.CSVLogger(str(run), name="lightning_logs", version=stage),
              enable_checkpointing=checkpoints, enable_model_summary=False, log_every_n_steps=10,
              enable_progress_bar=os.environ.get("CLASSFORGE_QUIET") != "1", num_sanity_val_steps=0,
              deterministic=False)
    if distributed:
        kw.update(num_nodes=cfg.num_nodes, strategy=cfg.dist_strategy)
    if budget:
        kw["max_time"] = {"seconds": max(1, int(budget))}
    trainer = L.Trainer(**kw)
    return trainer, hist


def _devices(d):
    if isinstance(d, int) or d == "auto":
        return d
    d = str(d)
    return int(d) if d.isdigit() else d
