"""One place that builds Lightning Trainers (devices, precision, callbacks) for every strategy."""

from __future__ import annotations

import copy
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint, TQDMProgressBar

from classforge.core.config import TrainConfig, parse_duration
from classforge.core.errors import ClassforgeError
from classforge.runtime.distributed import current
from classforge.runtime.engines import fast_cpu_bf16
from classforge.training.checkpoints import checkpoint_dir, journal_path

warnings.filterwarnings("ignore", ".*does not have many workers.*")
# the checkpoint folder already holds the epoch journal (and, on --resume, the checkpoints): expected
warnings.filterwarnings("ignore", ".*Checkpoint directory .* exists and is not empty.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*")
warnings.filterwarnings("ignore", ".*GPU available but not used.*")
warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
warnings.filterwarnings("ignore", ".*defined a `validation_step` but have no `val_dataloader`.*")  # a refit has none
for _name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda", "lightning.fabric"):
    logging.getLogger(_name).setLevel(logging.WARNING)


# Callbacks added to every Trainer of the runs started while they are listed here: classforge.training.search puts its
# optuna pruning callback here around one train() call (train() builds its Trainers deep inside a strategy).
RUN_CALLBACKS: list[Callback] = []


class History(Callback):
    """One row per epoch: losses, accuracies (global and per class), learning rate, and how fast it went.

    Timing columns: `epoch_time_s` (training + validation of the epoch, wall clock), `train_time_s`,
    `val_time_s`, `images_per_s` (training samples / train_time_s, forward + backward + optimizer step),
    and, when the module knows its forward cost, `ops_per_s` = operations of one forward pass per sample
    (anatomy.operations_per_sample: adds + mults + max + other; at the size trained on, and x 2 with SAM's
    two passes) x images_per_s. That is the issue's
    convention; the backward pass (about twice the forward) is not counted, so the machine really does
    roughly 3x `ops_per_s`."""

    def __init__(self, stage: str, journal: Path | None = None):
        self.stage, self.rows, self._t = stage, [], time.time()
        self._tv: float | None = None
        self._val_s = 0.0
        self.journal = journal  # rows are appended here as they come, so a killed run keeps its history

    def record(self, row: dict) -> None:
        self.rows.append(row)
        if self.journal is not None:
            self.journal.parent.mkdir(parents=True, exist_ok=True)
            with open(self.journal, "a") as f:
                f.write(json.dumps(row) + "\n")

    def on_train_epoch_start(self, trainer, pl_module):
        self._t, self._tv, self._val_s = time.time(), None, 0.0

    def on_validation_start(self, trainer, pl_module):
        self._tv = time.time()

    def on_validation_end(self, trainer, pl_module):
        if self._tv is not None:
            self._val_s += time.time() - self._tv
            self._tv = None

    def on_train_epoch_end(self, trainer, pl_module):
        m = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        lr = trainer.optimizers[0].param_groups[-1]["lr"] if trainer.optimizers else None
        total = time.time() - self._t
        train_s = max(1e-9, total - self._val_s)
        row = {"stage": self.stage, "epoch": trainer.current_epoch + 1,
               "train_loss": m.get("train_loss"), "train_acc": m.get("train_acc"),
               "val_loss": m.get("val_loss"), "val_acc": m.get("val_acc"), "lr": lr,
               "epoch_time_s": round(total, 3)}
        seen = getattr(pl_module, "train_seen", 0) * max(1, trainer.world_size)
        if seen:
            ops = getattr(pl_module, "ops_per_sample", None)
            if getattr(pl_module, "train_ops", 0):
                # the forward operations the epoch really ran per image: the mean over mixed image sizes
                # (progressive resizing), twice the one-pass cost with SAM (two forward passes per batch)
                ops = pl_module.train_ops / max(1, getattr(pl_module, "train_seen", 0)) or ops
            if getattr(pl_module, "reports_train_size", False):
                row["train_size"] = pl_module.train_size
            row.update(speed_columns(seen, train_s, ops))
            row["val_time_s"] = round(self._val_s, 3)
            prog = getattr(pl_module, "progress", None)
            if prog is not None and prog.t0 is not None:
                row["elapsed_s"] = round(prog.elapsed(), 3)
        row.update(per_class_columns(pl_module))
        self.record(row)
        say_epoch(row, trainer.max_epochs)


def speed_columns(images: int, seconds: float, ops_per_sample: int | None) -> dict:
    ips = images / max(1e-9, seconds)
    out = {"train_time_s": round(seconds, 3), "images_per_s": round(ips, 1)}
    if ops_per_sample:
        out["ops_per_s"] = float(f"{ops_per_sample * ips:.4g}")
    return out


MAX_CLASS_COLUMNS = 50  # more classes than this: per-class accuracy only in per_class_epochs.csv


def per_class_columns(pl_module) -> dict:
    """val_acc_<class> for the last validation, from the module's per-class counts."""
    pc = getattr(pl_module, "val_per_class_", None)
    names = getattr(pl_module, "class_names", None)
    if pc is None or not names:
        return {}
    correct, total = pc
    out = {"val_per_class": {n: (int(c), int(t)) for n, c, t in zip(names, correct.tolist(), total.tolist())}}
    if len(names) <= MAX_CLASS_COLUMNS:
        for n, c, t in zip(names, correct.tolist(), total.tolist()):
            out[f"val_acc_{n}"] = round(c / t, 5) if t else None
    return out


class EMAWeights(Callback):
    """An exponential moving average of the weights (parameters and BatchNorm statistics), updated after every
    optimizer step: ema = d * ema + (1 - d) * w, with d = min(decay, (1 + n) / (10 + n)) after n updates so
    that the average does not drag the random initialisation along early on (the warm-up of timm's ModelEmaV2
    and TensorFlow's ExponentialMovingAverage with num_updates).

    Validation, and so early stopping, the best-epoch weights, the curves and the final scores, uses the
    averaged weights: they are swapped in for every validation and copied into the model when training ends.
    Lightning's own EMAWeightAveraging wraps the whole LightningModule in an AveragedModel (a deep copy whose
    state does not reach our best-epoch snapshot); this one averages the model's state_dict in place."""

    def __init__(self, decay: float):
        if not 0.0 < decay < 1.0:
            raise ClassforgeError(f"--ema must be a decay between 0 and 1 (e.g. 0.999), or 0 for off; got {decay}")
        self.decay, self.updates = float(decay), 0
        self.ema: dict[str, torch.Tensor] | None = None
        self._live: dict[str, torch.Tensor] | None = None

    def _state(self, pl_module) -> dict[str, torch.Tensor]:
        return pl_module.model.state_dict()

    def on_fit_start(self, trainer, pl_module):
        if self.ema is None:  # not restored from a checkpoint
            self.ema = {k: t.detach().clone() for k, t in self._state(pl_module).items()}
        else:
            self.ema = {k: t.to(pl_module.device) for k, t in self.ema.items()}

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, w in self._state(pl_module).items():
            e = self.ema[k]
            if e.dtype.is_floating_point:
                e.lerp_(w.detach(), 1.0 - d)  # e = d * e + (1 - d) * w
            else:
                e.copy_(w)  # e.g. BatchNorm's num_batches_tracked

    @torch.no_grad()
    def _swap(self, pl_module) -> None:
        for k, w in self._state(pl_module).items():
            tmp = w.detach().clone()
            w.copy_(self.ema[k])
            self.ema[k].copy_(tmp)

    def on_validation_epoch_start(self, trainer, pl_module):
        if self.ema is not None and trainer.state.fn == "fit":
            self._swap(pl_module)
            self._live = self.ema  # now holds the live weights until validation ends

    def on_validation_epoch_end(self, trainer, pl_module):
        if self._live is not None:
            self._swap(pl_module)
            self._live = None

    def averaged_state(self, pl_module) -> dict[str, torch.Tensor]:
        """The averaged weights, whether or not they are swapped in right now."""
        src = self._state(pl_module) if self._live is not None else self.ema
        return {k: t.detach().cpu().clone() for k, t in src.items()}

    @torch.no_grad()
    def on_train_end(self, trainer, pl_module):
        if self.ema is not None and self._live is None:
            for k, w in self._state(pl_module).items():
                w.copy_(self.ema[k])

    def state_dict(self):
        return {"decay": self.decay, "updates": self.updates,
                "ema": {k: t.detach().cpu() for k, t in (self.ema or {}).items()}}

    def load_state_dict(self, state_dict):
        self.updates = int(state_dict.get("updates", 0))
        self.ema = dict(state_dict["ema"]) or None


class BestWeights(Callback):
    """Keep the weights of the best epoch in memory (by the monitored metric) and restore them at the end.
    With an `EMAWeights` callback the validation scored the averaged weights, so those are the ones kept."""

    def __init__(self, monitor: str, ema: EMAWeights | None = None):
        self.monitor, self.best, self.state, self.ema = monitor, float("inf"), None, ema

    def on_train_epoch_end(self, trainer, pl_module):
        v = trainer.callback_metrics.get(self.monitor)
        if v is not None and float(v) < self.best:
            self.best = float(v)
            if self.ema is not None and self.ema.ema is not None:
                self.state = self.ema.averaged_state(pl_module)
            else:
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


def say_epoch(row: dict, max_epochs: int | None) -> None:
    """One line per epoch that stays on screen and in logs (the live bar disappears when the epoch ends)."""
    if os.environ.get("CLASSFORGE_QUIET") == "1" or not is_global_zero_process():
        return
    from tqdm.auto import tqdm

    total = f"/{max_epochs}" if max_epochs and max_epochs < BUDGET_SHOWN_EPOCHS else ""
    parts = [f"epoch {row['epoch']}{total}"]
    for key, name in (("train_loss", "train loss"), ("val_loss", "val loss"), ("val_acc", "val acc")):
        if row.get(key) is not None:
            parts.append(f"{name} {row[key]:.4f}" if "loss" in key else f"{name} {row[key]:.3f}")
    parts.append(f"{row['epoch_time_s']:.1f} s")
    if row.get("images_per_s"):
        parts.append(f"{row['images_per_s']:,.0f} images/s")
    tqdm.write("  " + ", ".join(parts), file=sys.stderr)


def is_global_zero_process() -> bool:
    return int(os.environ.get("RANK", os.environ.get("GLOBAL_RANK", "0"))) == 0 and \
        int(os.environ.get("LOCAL_RANK", "0")) == 0


class EpochBar(TQDMProgressBar):
    """Lightning's bar with the epoch counted from 1 out of the real total ("Epoch 2/5"; "Epoch 2" under a time
    budget) and without its logger version number. Only on a terminal: logs get History's rows instead."""

    def on_train_epoch_start(self, trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        total = trainer.max_epochs
        shown = f"/{total}" if total and 0 < total < BUDGET_SHOWN_EPOCHS else ""
        self.train_progress_bar.set_description(f"Epoch {trainer.current_epoch + 1}{shown}")

    def get_metrics(self, trainer, pl_module):
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items


BUDGET_SHOWN_EPOCHS = 10_000  # a larger max_epochs is a time budget's open end: the bar shows no total


def make_trainer(cfg: TrainConfig, run: Path, stage: str, max_epochs: int, monitor: str, *,
                 distributed: bool = True, checkpoints: bool = True, precision: str | None = None,
                 max_time_s: float | None = None, extra_callbacks: list | None = None):
    ema = EMAWeights(cfg.ema) if cfg.ema else None
    hist, best = History(stage, journal_path(run)), BestWeights(monitor, ema)
    # EMA first: its swap must precede every other callback's validation hooks
    callbacks = ([ema] if ema else []) + [hist, best, EarlyStopping(monitor=monitor, patience=cfg.patience, mode="min")]
    if checkpoints:
        # Best by the monitor, plus the latest epoch as last.ckpt for --resume. Lightning 2.6 refreshes
        # `save_last` only when a top-k checkpoint is written (i.e. when the monitor improves), so a separate
        # unmonitored checkpoint keeps last.ckpt at the latest epoch.
        callbacks.append(ModelCheckpoint(dirpath=checkpoint_dir(run), filename=f"{stage}-best", monitor=monitor,
                                         save_top_k=1, mode="min"))
        callbacks.append(ModelCheckpoint(dirpath=checkpoint_dir(run), filename="last", monitor=None, save_top_k=1,
                                         enable_version_counter=False))
    callbacks += (extra_callbacks or []) + RUN_CALLBACKS
    bar = os.environ.get("CLASSFORGE_QUIET") != "1" and sys.stderr.isatty()
    if bar:
        callbacks.append(EpochBar())
    budget = max_time_s if max_time_s is not None else (parse_duration(cfg.train_budget)
                                                         or parse_duration(cfg.time_budget))
    devices = _devices(cfg.devices) if distributed else 1
    accelerator = cfg.accelerator if distributed else ("cpu" if not torch.cuda.is_available() else cfg.accelerator)
    kw = dict(accelerator=accelerator, devices=devices, max_epochs=max_epochs, callbacks=callbacks,
              precision=precision or resolve_precision(cfg, cfg.accelerator),
              logger=L.pytorch.loggers.CSVLogger(str(checkpoint_dir(run)), name="lightning_logs", version=stage),
              enable_checkpointing=checkpoints, enable_model_summary=False, log_every_n_steps=10,
              enable_progress_bar=bar, num_sanity_val_steps=0,
              deterministic=False)
    if distributed:
        kw.update(num_nodes=cfg.num_nodes, strategy=cfg.dist_strategy)
        group = current()
        if group.world_size > 1:  # the processes runtime.distributed started or joined: Lightning joins them too
            kw.update(devices=group.local_world_size, num_nodes=group.world_size // group.local_world_size)
    if budget:
        kw["max_time"] = {"seconds": max(1, int(budget))}
    trainer = L.Trainer(**kw)
    return trainer, hist


def _devices(d):
    if isinstance(d, int) or d == "auto":
        return d
    d = str(d)
    return int(d) if d.isdigit() else d
