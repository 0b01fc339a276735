"""Fit a whole network with Lightning: fine-tune, second stage of two-stage, or from scratch."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, WeightedRandomSampler

from classforge.core.config import (
    DEFAULT_BACKBONE_LR_MULT,
    DEFAULT_EPOCHS,
    DEFAULT_LR,
    TrainConfig,
    parse_duration,
)
from classforge.core.errors import ClassforgeError
from classforge.core.files import open_csv
from classforge.data.image import small_image
from classforge.data.preprocess import make_preprocessor
from classforge.models.anatomy import operations_per_sample
from classforge.models.registry import Classifier
from classforge.runtime.distributed import current, wants_gpu
from classforge.training.checkpoints import checkpoint_dir, journal_path, read_journal
from classforge.training.module import ClassifierModule, FileDataset, TensorBatchDataset
from classforge.training.optimizers import get_optimizer
from classforge.training.prepared import audio_kwargs, class_weights, load_raws
from classforge.training.schedules import SCHEDULES, parse_progressive
from classforge.training.trainer import (
    BestWeights,
    make_trainer,
    per_class_columns,
)
from classforge.training.tricks import batch_transforms, step_rule


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


BUDGET_MAX_EPOCHS = 100_000  # with --time-budget and no --epochs the budget alone ends training


def resolve_optimizer(cfg: TrainConfig) -> str:
    opt = cfg.optimizer if cfg.optimizer != "auto" else ("sgd" if cfg.schedule == "step" else "adamw")
    entry = get_optimizer(opt)
    if entry.check:
        entry.check(dict(cfg.optimizer_args))
    return opt


def resolve_lr(cfg: TrainConfig, stage: str, optimizer: str) -> float:
    """--lr, else the course's 0.01 for the step schedule, 0.05 for SGD-like steps, the strategy default else."""
    if cfg.lr not in ("default", "auto"):
        return float(cfg.lr)
    if cfg.schedule == "step":
        return 0.01
    return 0.05 if get_optimizer(optimizer).sgd_like else DEFAULT_LR[stage]


def resolve_weight_decay(cfg: TrainConfig, optimizer: str) -> float:
    # 0.05 is AdamW's decoupled default; as SGD's L2 term it would swamp the gradient: 5e-4 instead.
    sgd_like = get_optimizer(optimizer).sgd_like
    return 5e-4 if sgd_like and cfg.weight_decay == TrainConfig.weight_decay else cfg.weight_decay


def fit_lightning(model: Classifier, data, cfg: TrainConfig, run: Path, stage: str, extra: dict,
                  warm_start: bool = False) -> list[dict]:
    """Train the network for `stage`; warm_start continues from the model's current weights (a refit), so a
    from-scratch network's data-fitted stem is not fitted again."""
    spec = model.backbone.spec
    if cfg.schedule not in SCHEDULES:
        raise ClassforgeError(f"--schedule must be one of {', '.join(SCHEDULES)}, not {cfg.schedule!r}")
    whole_run = parse_duration(cfg.time_budget)
    budget = parse_duration(cfg.train_budget) or whole_run
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    train_dl, val_dl, fast = make_loaders(model, data, cfg)
    resuming = cfg.resume and (checkpoint_dir(run) / "last.ckpt").exists()
    if stage == "scratch" and not resuming and not cfg.weights and not warm_start:
        if model.backbone.init_from_data(init_batch(train_dl.dataset, seed=cfg.seed)):
            extra["data_init"] = "patch-whitening stem fitted on training images"
    epochs = cfg.epochs or (BUDGET_MAX_EPOCHS if budget else DEFAULT_EPOCHS[stage])
    optimizer = resolve_optimizer(cfg)
    lr = resolve_lr(cfg, stage, optimizer)
    for p in model.parameters():
        p.requires_grad_(True)
    if cfg.grad_checkpointing:
        model.backbone.set_grad_checkpointing(True)
    steps = epochs * max(1, math.ceil(len(train_dl) / _world(cfg)))
    ops = forward_ops(model)
    plan = parse_progressive(cfg.progressive_resize, spec.size) if spec.task == "image" else []
    ops_by_size = {size: forward_ops(model, size).get("ops") for _, size in plan}
    mult = DEFAULT_BACKBONE_LR_MULT if cfg.backbone_lr_mult is None else cfg.backbone_lr_mult
    module = ClassifierModule(model, lr_groups(model, stage, lr, mult),
                              resolve_weight_decay(cfg, optimizer), total_steps=steps,
                              warmup_steps=int(cfg.warmup_epochs * len(train_dl)),
                              class_weights=class_weights(data, cfg) if cfg.balance == "weights" else None,
                              label_smoothing=cfg.label_smoothing, channels_last=spec.task == "image",
                              optimizer=optimizer, schedule=cfg.schedule, budget_s=budget, momentum=cfg.momentum,
                              class_names=data.labels, ops_per_sample=ops.get("ops"), compile=cfg.compile,
                              ops_by_size=ops_by_size, optimizer_args=cfg.optimizer_args,
                              batch_transforms=batch_transforms(cfg, plan), step_rule=step_rule(cfg))
    monitor = "val_loss" if val_dl else "train_loss"
    # Pretrained backbones (finetune, two-stage): keep BatchNorm statistics frozen while the weights adapt.
    # Measured on FSDD with the AudioSet mn04 (BN momentum 0.01): with BN in train mode the net fits its batch
    # statistics while eval mode still uses AudioSet's, and eval accuracy stayed near chance (0.25 after 3
    # epochs vs 0.67 with frozen BN on the same 200 clips); hymenoptera two-stage val loss rose 0.21 -> 0.65.
    pretrained = model.backbone.weights_source not in ("random", "")
    frozen_bn = [FreezeBatchNorm()] if stage in ("two-stage", "finetune") and pretrained else []
    trainer, hist = make_trainer(cfg, run, stage, epochs, monitor, extra_callbacks=frozen_bn)
    if cfg.lr == "auto":
        tune_lr(trainer, module, train_dl, val_dl, run)
    ckpt = checkpoint_dir(run) / "last.ckpt"
    rows = []
    if resuming:
        check_checkpoint(ckpt)
        rows = read_journal(run, stage)  # the epochs before the stop (a kill included), which Lightning forgets
    else:
        journal_path(run).unlink(missing_ok=True)
        if val_dl is not None:
            first = pre_training_eval(trainer, module, val_dl, stage)
            hist.record(first)
            hist.rows.remove(first)
            rows.append(first)
            seed_best(trainer, module, first.get("val_loss"))
    if whole_run and not cfg.train_budget and extra.get("started_at"):
        val_s = rows[0].get("val_time_s", 0.0) if rows and rows[0].get("epoch") == 0 else 0.0
        share = plan_training_time(budget, extra["started_at"], len(data.of("val")), len(data.of("test")), val_s)
        set_training_time(trainer, module, share["training_s"])
        extra["time_budget"] = share
        print(f"Time budget {share['whole_run_s']:.0f} s for the whole run: {share['before_training_s']:.0f} s "
              f"spent before training, {share['reserved_for_scoring_s']:.0f} s kept for scoring, "
              f"{share['training_s']:.0f} s to train")
        if share["note"]:
            data.notes.append(share["note"])
    trainer.fit(module, train_dl, val_dl, ckpt_path=str(ckpt) if resuming else None)
    model.backbone.set_grad_checkpointing(False)
    model.to(memory_format=torch.contiguous_format)
    resumed_at = min((r["epoch"] for r in hist.rows), default=None)
    rows = [r for r in rows if resumed_at is None or r["epoch"] < resumed_at] + hist.rows
    write_per_class(run, rows, data.labels)
    extra["trainer"] = {"world_size": trainer.world_size, "strategy": type(trainer.strategy).__name__,
                        "accelerator": type(trainer.accelerator).__name__, "precision": str(trainer.precision),
                        "epochs_run": trainer.current_epoch, "stopped_by": stop_reason(trainer),
                        "optimizer": optimizer, "lr": module.lr, "schedule": cfg.schedule,
                        "optimizer_args": dict(cfg.optimizer_args) or None,
                        "weight_decay": module.weight_decay,
                        "time_budget_s": extra.get("time_budget", {}).get("training_s", budget),
                        "data_path": data_path_desc(fast, cfg.cutout),
                        "loader_workers": train_dl.num_workers,
                        "progressive_resize": [{"until": u, "size": sz} for u, sz in plan] or None,
                        "sam": cfg.sam or None,
                        "mix": ({"mixup": cfg.mixup, "cutmix": cfg.cutmix, "prob": cfg.mix_prob}
                                if cfg.mixup or cfg.cutmix else None),
                        "channels_last": module.channels_last, "compiled": bool(cfg.compile),
                        "threads": torch.get_num_threads(),
                        "forward_ops_per_sample": ops.get("ops"), "forward_macs_per_sample": ops.get("macs")}
    return rows


SCORING_MARGIN = 1.5  # final scoring decodes every file again (and may export first): slower per file than val
SCORING_FIXED_S = 3.0  # export, report and plots


def plan_training_time(budget_s: float, started_at: float, val_files: int, test_files: int,
                       val_seconds: float) -> dict:
    """--time-budget is the whole run's: what training may take is the budget minus what came before (checking
    files, embeddings for two-stage, the validation before training) minus what scoring will take after,
    estimated from the measured validation pass."""
    spent = time.time() - started_at
    per_file = val_seconds / val_files if val_files and val_seconds else 0.0
    reserve = per_file * (val_files + test_files) * SCORING_MARGIN + SCORING_FIXED_S
    training = budget_s - spent - reserve
    note = ""
    if training < 0.1 * budget_s:
        training = max(1.0, 0.1 * budget_s)
        note = (f"--time-budget {budget_s:.0f} s leaves little for training: {spent:.0f} s went to preparing, "
                f"{reserve:.0f} s are kept for scoring; trained for {training:.0f} s (give a larger budget)")
    return {"whole_run_s": round(budget_s, 1), "before_training_s": round(spent, 2),
            "reserved_for_scoring_s": round(reserve, 1), "training_s": round(training, 1), "note": note}


def set_training_time(trainer, module, seconds: float) -> None:
    """The Timer that stops training, and the schedule that plans over the same clock, get `seconds`."""
    from lightning.pytorch.callbacks import Timer

    for cb in trainer.callbacks:
        if isinstance(cb, Timer):
            cb._duration = float(seconds)  # Timer keeps its limit here; there is no public setter
    module.progress.budget_s = float(seconds)


def check_checkpoint(path: Path) -> None:
    """--resume reads the run's last.ckpt (in the cache) as plain tensors and containers (never arbitrary pickled
    objects); a file cut short by a crash, or one that is not a training checkpoint, is a clear error."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or "state_dict" not in state or "epoch" not in state:
            raise ValueError("not a training checkpoint (no weights or epoch in it)")
    except Exception as e:  # noqa: BLE001 - truncated zip, wrong file, refused pickle: all the same advice
        reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise ClassforgeError(f"checkpoint {path} is unreadable ({reason}): start again without --resume "
                              "(or with another --out)") from None


class FreezeBatchNorm(L.Callback):
    """Keep every BatchNorm layer in eval mode during training (affine weights still learn)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        for m in pl_module.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()


def seed_best(trainer, module, val_loss) -> None:
    """The starting point counts: if no epoch beats the pre-training validation loss (e.g. fine-tuning after a
    good head), early stopping ends training and the starting weights are kept."""
    from lightning.pytorch.callbacks import EarlyStopping

    if val_loss is None:
        return
    for cb in trainer.callbacks:
        if isinstance(cb, BestWeights):
            cb.best = float(val_loss)
            cb.state = {k: t.detach().cpu().clone() for k, t in module.model.state_dict().items()}
        elif isinstance(cb, EarlyStopping) and cb.monitor == "val_loss":
            cb.best_score = torch.tensor(float(val_loss))


def forward_ops(model: Classifier, size: int | None = None) -> dict:
    """anatomy.operations_per_sample for image models at `size` (default: the model's input size); an empty
    dict when the anatomy cannot count it."""
    spec = model.backbone.spec
    if spec.task != "image":
        return {}
    tta = model.backbone.tta
    if tta != "none":
        model.backbone.tta = "none"  # training runs one view per image; the test-time mirror view is extra
    try:
        return operations_per_sample(model, (spec.channels, size or spec.size, size or spec.size))
    except Exception:  # noqa: BLE001 - a model the anatomy cannot trace still trains; it just has no ops/s
        return {}
    finally:
        if tta != "none":
            model.backbone.tta = tta


def data_path_desc(fast: bool, cutout: int) -> str:
    cut = f" + cutout {cutout}x{cutout}" if cutout else ""
    return f"batched tensors (in-memory uint8, batch crop+flip{cut})" if fast else f"per-sample{cut}"


def make_loaders(model: Classifier, data, cfg: TrainConfig):
    """(train_dl, val_dl, fast). Small images with the pad-crop-flip recipe go through TensorBatchDataset
    (whole batches augmented with tensor ops); everything else through per-sample transforms."""
    spec = model.backbone.spec
    pre = make_preprocessor(spec, augment=cfg.augment, max_pixels=cfg.max_pixels, seed=cfg.seed, kept=data.kept,
                            **audio_kwargs(cfg))
    tr, va = data.of("train"), data.of("val")
    ytr, yva = data.y("train"), data.y("val")
    raws_tr, raws_va = load_raws(tr, pre, "Decoding train"), (load_raws(va, pre, "Decoding val") if va else [])
    sampler = _sampler(ytr, cfg, len(data.labels))
    bs = min(cfg.batch_size, len(raws_tr))
    g = torch.Generator().manual_seed(cfg.seed)
    fast = (spec.task == "image" and small_image(spec) and getattr(pre, "augment", "") in ("cifar", "none")
            and _world(cfg) == 1 and cfg.extra.get("fast_data", True))
    vbs = max(bs, 256 if fast else 64)
    if fast:
        pad = max(1, spec.size // 8) if pre.augment == "cifar" else 0
        train_ds = TensorBatchDataset(to_uint8(raws_tr, spec), ytr, spec.mean, spec.std, train=True, pad=pad,
                                      flip=pre.augment == "cifar", seed=cfg.seed, cutout=cfg.cutout)
        base = sampler if sampler is not None else RandomSampler(train_ds, generator=g)
        train_dl = DataLoader(train_ds, sampler=BatchSampler(base, bs, drop_last=len(train_ds) > bs), batch_size=None)
        val_dl = None
        if raws_va:
            val_ds = TensorBatchDataset(to_uint8(raws_va, spec), yva, spec.mean, spec.std, train=False)
            val_dl = DataLoader(val_ds, sampler=BatchSampler(SequentialSampler(val_ds), vbs, drop_last=False),
                                batch_size=None)
        return train_dl, val_dl, True
    train_ds = FileDataset(raws_tr, ytr, pre, train=True, cutout=cfg.cutout)
    val_ds = FileDataset(raws_va, yva, pre, train=False) if raws_va else None
    gpu = wants_gpu(cfg.accelerator)
    workers = loader_workers(cfg.num_workers, gpu)
    loading = dict(num_workers=workers, persistent_workers=workers > 0, pin_memory=gpu)
    train_dl = DataLoader(train_ds, batch_size=bs, shuffle=sampler is None, sampler=sampler,
                          drop_last=len(train_ds) > bs, generator=g, **loading)
    val_dl = DataLoader(val_ds, batch_size=vbs, **loading) if val_ds else None
    return train_dl, val_dl, False


def loader_workers(setting: int | str, gpu: bool) -> int:
    """--num-workers as a number. auto: on a GPU the augmentation of one Python process cannot keep up, so one
    worker per core this process may use (the run's processes on this machine share them), up to 8; on a CPU
    the training step already uses every core, and workers would take cores from it."""
    s = str(setting).strip().lower()
    if s != "auto":
        if not s.isdigit():
            raise ClassforgeError(f"--num-workers must be a number or auto, not {setting!r}")
        return int(s)
    if not gpu:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores // max(1, current().local_world_size) - 1))


def init_batch(ds, n: int = 2000, seed: int = 0) -> torch.Tensor:
    """Up to n normalised, un-augmented training inputs (for data-dependent initialisation)."""
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n]
    if isinstance(ds, TensorBatchDataset):
        return (ds.images[idx].float() - ds.mean) * ds.inv_std
    return torch.stack([ds.pre.eval(ds.raws[i]) for i in idx.tolist()])


def to_uint8(raws: list, spec) -> torch.Tensor:
    """Decoded PIL images -> (N, C, S, S) uint8 with the eval geometry (resize short side, centre crop)."""
    import numpy as np
    from torchvision.transforms import v2 as T

    geo = T.Compose([T.ToImage(), T.Resize(int(round(spec.size / spec.crop_pct)), antialias=True,
                                           interpolation=T.InterpolationMode.BILINEAR
                                           if spec.interpolation == "bilinear" else T.InterpolationMode.BICUBIC),
                     T.CenterCrop(spec.size)])
    out = torch.empty((len(raws), 3, spec.size, spec.size), dtype=torch.uint8)
    for i, img in enumerate(raws):
        if img.size == (spec.size, spec.size):
            out[i] = torch.from_numpy(np.array(img)).permute(2, 0, 1)
        else:
            out[i] = geo(img)
    return out


def write_per_class(run: Path, rows: list[dict], labels: list[str]) -> None:
    """per_class_epochs.csv (stage, epoch, class, n, correct, accuracy) and per_class_curves.png; the
    `val_per_class` counts are moved out of the metrics rows."""
    import csv

    long = []
    for r in rows:
        pc = r.pop("val_per_class", None)
        for name, (c, t) in (pc or {}).items():
            long.append({"stage": r["stage"], "epoch": r["epoch"], "class": name, "n": t, "correct": c,
                         "accuracy": round(c / t, 5) if t else ""})
    if not long:
        return
    with open_csv(run / "per_class_epochs.csv", "w") as f:
        w = csv.DictWriter(f, fieldnames=list(long[0]))
        w.writeheader()
        w.writerows(long)
    try:
        plot_per_class(run / "per_class_curves.png", rows, labels)
    except Exception:  # noqa: BLE001 - a plot must never fail a run
        pass


def plot_per_class(path: Path, rows: list[dict], labels: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [i for i, r in enumerate(rows) if r.get("val_acc") is not None]
    if len(xs) < 2 or len(labels) > 50:
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    ep = [rows[i]["epoch"] for i in xs]
    for name in labels:
        ax.plot(ep, [rows[i].get(f"val_acc_{name}") for i in xs], lw=1, label=name)
    ax.plot(ep, [rows[i]["val_acc"] for i in xs], "k-", lw=2.5, label="all")
    ax.set_xlabel("epoch (0 = before training)")
    ax.set_ylabel("validation accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def stop_reason(trainer) -> str:
    from lightning.pytorch.callbacks import EarlyStopping, Timer

    for cb in trainer.callbacks:
        if isinstance(cb, EarlyStopping) and cb.stopped_epoch:
            return "early stopping"
        if isinstance(cb, Timer) and cb.time_remaining() is not None and cb.time_remaining() <= 0:
            return "time budget"
    return "max epochs"


def _world(cfg: TrainConfig) -> int:
    if current().world_size > 1:  # the processes already started (by --devices, torchrun or SLURM)
        return current().world_size
    d = str(cfg.devices)
    return int(d) * cfg.num_nodes if d.isdigit() else 1


def pre_training_eval(trainer, module, val_dl, stage: str) -> dict:
    """Validation before the first epoch (global and per class): the starting point of the curves."""
    t = time.time()
    res = trainer.validate(module, val_dl, verbose=False)
    m = res[0] if res else {}
    row = {"stage": stage, "epoch": 0, "val_loss": m.get("val_loss"), "val_acc": m.get("val_acc"),
           "val_time_s": round(time.time() - t, 3)}
    row.update(per_class_columns(module))
    return row


def tune_lr(trainer, module, train_dl, val_dl, run: Path) -> None:
    from lightning.pytorch.tuner import Tuner

    n = max(40, min(100, 3 * len(train_dl)))  # the suggestion skips the first 10 points
    max_epochs = trainer.fit_loop.max_epochs
    trainer.fit_loop.max_epochs = max(max_epochs, math.ceil(n / max(1, len(train_dl))) + 1)  # epochs must not cut it
    try:
        finder = Tuner(trainer).lr_find(module, train_dl, val_dl, min_lr=1e-6, max_lr=1e-1, num_training=n)
    finally:
        trainer.fit_loop.max_epochs = max_epochs
    if finder is None:
        return
    fig = finder.plot(suggest=True)
    fig.savefig(run / "lr_finder.png", dpi=100)
    suggestion = finder.suggestion()
    if not suggestion:
        print(f"  learning-rate finder gave no suggestion; keeping {module.lr:.2e} (plot: {run / 'lr_finder.png'})")
    if suggestion:
        module.lr = float(suggestion)
        print(f"  learning-rate finder suggests {suggestion:.2e} (plot: {run / 'lr_finder.png'})")
