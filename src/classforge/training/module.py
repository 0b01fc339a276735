"""LightningModules: what to compute. The Trainer (run.py) decides how: devices, precision, callbacks."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from classforge.training.optimizers import OptimizerSettings, get_optimizer
from classforge.training.schedules import Progress, make_lambda


class FileDataset(Dataset):
    """Decoded files held in memory (decoded once), transformed per access: train or eval."""

    def __init__(self, raws: list, labels: list[int], preprocessor, train: bool, cutout: int = 0):
        self.raws, self.labels, self.pre, self.train = raws, labels, preprocessor, train
        self.cutout = int(cutout)

    def __len__(self) -> int:
        return len(self.raws)

    def __getitem__(self, i):
        raw = self.raws[i]
        x = self.pre.train(raw) if self.train else self.pre.eval(raw)
        if self.train and self.cutout:  # (C, H, W) normalised image (run.check_cutout: images only): 0 is the mean
            x = batch_cutout(x[None], self.cutout)[0]
        return x, self.labels[i]


class TensorBatchDataset(Dataset):
    """Small images as one uint8 tensor (N, C, S, S) in memory, served a whole batch at a time.

    Indexed with a list of indices (use it with `sampler=BatchSampler(...)`, `batch_size=None`); augmentation
    runs on the whole batch with tensor ops: zero-pad by `pad`, random S x S crop, horizontal flip
    (the CIFAR recipe), optionally cutout (a random `cutout` x `cutout` square set to the mean pixel), then
    float + normalise, channels_last. Per-sample PIL/torchvision transforms cost
    more than the network itself on 32x32 images; this costs about a millisecond per batch of 256."""

    def __init__(self, images: torch.Tensor, labels: list[int], mean, std, train: bool, pad: int = 4,
                 flip: bool = True, seed: int = 0, cutout: int = 0):
        self.images = images  # (N, C, S, S) uint8
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        c = images.shape[1]
        self.mean = torch.tensor(mean[:c], dtype=torch.float32).view(1, c, 1, 1) * 255
        self.inv_std = 1.0 / (torch.tensor(std[:c], dtype=torch.float32).view(1, c, 1, 1) * 255)
        self.train, self.pad, self.flip, self.cutout = train, int(pad), flip, int(cutout)
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, idx):
        idx = torch.as_tensor(idx, dtype=torch.long)
        x = self.images[idx]  # (B, C, S, S) uint8
        if self.train:
            x = batch_crop_flip(x, self.pad, self.flip, self.gen)
        x = (x.float() - self.mean) * self.inv_std
        if self.train and self.cutout:
            x = batch_cutout(x, self.cutout, self.gen)  # after normalising, so the square is the mean pixel
        return x.contiguous(memory_format=torch.channels_last), self.labels[idx]


def batch_crop_flip(x: torch.Tensor, pad: int, flip: bool, gen: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample random crop of a zero-padded batch + random horizontal flip. x: (B, C, H, W), any dtype."""
    b, c, h, w = x.shape
    if pad > 0:
        xp = F.pad(x, (pad, pad, pad, pad))  # (B, C, H+2p, W+2p)
        oy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
        ox = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
        rows = (oy[:, None] + torch.arange(h)[None, :])[:, None, :, None]  # (B, 1, H, 1)
        cols = (ox[:, None] + torch.arange(w)[None, :])[:, None, None, :]  # (B, 1, 1, W)
        x = xp[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
    if flip:
        m = torch.rand(b, generator=gen) < 0.5
        x = torch.where(m[:, None, None, None], x.flip(3), x)
    return x


def batch_cutout(x: torch.Tensor, size: int, gen: torch.Generator | None = None) -> torch.Tensor:
    """Cutout (DeVries & Taylor 2017): zero a size x size square per sample, centred on a uniformly random
    pixel, so near a border only part of it lies inside the image. x: (B, C, H, W) float, normalised (0 is
    the mean pixel). Returns a new tensor."""
    b, _, h, w = x.shape
    cy = torch.randint(0, h, (b,), generator=gen)
    cx = torch.randint(0, w, (b,), generator=gen)
    y0, x0 = cy - size // 2, cx - size // 2  # the square covers [y0, y0 + size) x [x0, x0 + size), clipped
    ys, xs = torch.arange(h), torch.arange(w)
    in_y = (ys[None, :] >= y0[:, None]) & (ys[None, :] < (y0 + size)[:, None])  # (B, H)
    in_x = (xs[None, :] >= x0[:, None]) & (xs[None, :] < (x0 + size)[:, None])  # (B, W)
    keep = ~(in_y[:, :, None] & in_x[:, None, :])  # (B, H, W)
    return x * keep[:, None].to(x.dtype)


def warmup_cosine(total_steps: int, warmup_steps: int):
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        p = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, p)))

    return f


class ClassifierModule(L.LightningModule):
    """Cross-entropy training of a Classifier (or a bare head on cached embeddings).

    `lr_groups` is a list of (params, lr) from input to output: discriminative learning rates when the
    backbone is unfrozen. The LR schedule (per optimizer step) is warm-up + cosine over `total_steps`, or,
    when `budget_s` is given or `schedule` is step/onecycle, a function of training progress
    (schedules.Progress: the larger of steps / total_steps and elapsed / budget_s), so that it stretches to a
    time budget. Validation also counts correct answers per class (`val_per_class_`)."""

    def __init__(self, model: nn.Module, lr_groups: list[tuple[list, float]], weight_decay: float = 0.05,
                 total_steps: int = 1000, warmup_steps: int = 0, class_weights: torch.Tensor | None = None,
                 label_smoothing: float = 0.0, channels_last: bool = False, optimizer: str = "adamw",
                 schedule: str = "cosine", budget_s: float | None = None, momentum: float = 0.9,
                 num_classes: int | None = None, class_names: list[str] | None = None,
                 ops_per_sample: int | None = None, compile: bool = False,
                 ops_by_size: dict[int, int] | None = None, optimizer_args: dict | None = None,
                 batch_transforms: Sequence[Callable] = (), step_rule=None):
        super().__init__()
        self.model = model
        self.lr_groups = lr_groups
        self.weight_decay = weight_decay
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.label_smoothing = label_smoothing
        self.channels_last = channels_last
        self.optimizer_name = optimizer
        self.schedule = schedule
        self.momentum = momentum
        self.progress = Progress(total_steps, budget_s)
        self.class_names = list(class_names) if class_names else None
        self.num_classes = num_classes or (len(class_names) if class_names else None)
        self.ops_per_sample = ops_per_sample
        # Training tricks plug in here (training.tricks): batch transforms map a training batch (x, y, mix) to a
        # new (x, mix) in order, where mix = (partner labels, lam) for a blended batch; a step rule replaces the
        # optimiser step and may run a second forward-backward pass on the same transformed batch.
        self.batch_transforms = list(batch_transforms)
        self.step_rule = step_rule
        self.repeat_batch = False  # set by the step rule around its second pass
        self._last_batch = None
        self.ops_by_size = dict(ops_by_size or {})  # forward operations per sample at input sizes other than full
        self.train_size: int | None = None  # the size of the last training batch (None: not yet, or not images)
        self.train_ops = 0  # forward operations of the training samples since the epoch started
        self.optimizer_args = dict(optimizer_args or {})  # the optimizer entry's own options
        self.register_buffer("class_weights", class_weights if class_weights is not None else torch.empty(0))
        self.lr = lr_groups[-1][1]  # the LR finder tunes this one (the head's); others keep their ratios
        self._base_lrs = [lr for _, lr in lr_groups]
        self.train_seen = 0  # training samples since the epoch started (for images/s)
        self.val_per_class_: tuple[torch.Tensor, torch.Tensor] | None = None  # (correct, total) per class
        self._val_correct = self._val_total = None
        if channels_last:  # both the weights and the inputs, or oneDNN converts at every layer
            self.model.to(memory_format=torch.channels_last)
        # Compiled forward kept outside the module tree, so state_dict keys and checkpoints stay unchanged.
        object.__setattr__(self, "_fwd", torch.compile(self.model) if compile else self.model)

    def forward(self, x):
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self._fwd(x) if self.training else self.model(x)

    def _step(self, batch, stage: str, mix: tuple[torch.Tensor, float] | None = None):
        """Loss and accuracy of a batch; `mix` = (partner labels, lam) for a mixed training batch, whose loss
        is lam * CE(y) + (1 - lam) * CE(partner) and accuracy the same blend of the two hit rates."""
        x, y = batch
        logits = self(x)
        w = self.class_weights if self.class_weights.numel() else None
        smooth = self.label_smoothing if stage == "train" else 0.0
        loss = F.cross_entropy(logits.float(), y, weight=w, label_smoothing=smooth)
        pred = logits.argmax(-1)
        acc = (pred == y).float().mean()
        if mix is not None:
            y2, lam = mix
            loss = lam * loss + (1.0 - lam) * F.cross_entropy(logits.float(), y2, weight=w, label_smoothing=smooth)
            acc = lam * acc + (1.0 - lam) * (pred == y2).float().mean()
        if stage == "train" and self.repeat_batch:
            return loss  # a step rule's second pass: the step's numbers come from the first
        self.log(f"{stage}_loss", loss, prog_bar=True, on_step=False, on_epoch=True, sync_dist=True, batch_size=len(y))
        self.log(f"{stage}_acc", acc, prog_bar=True, on_step=False, on_epoch=True, sync_dist=True, batch_size=len(y))
        if stage == "val" and self.num_classes:
            self._val_correct += torch.bincount(y[pred == y], minlength=self.num_classes)[: self.num_classes]
            self._val_total += torch.bincount(y, minlength=self.num_classes)[: self.num_classes]
        return loss

    def on_train_start(self):
        from lightning.pytorch.callbacks import Timer

        self.progress.start(next((cb for cb in self.trainer.callbacks if isinstance(cb, Timer)), None))

    def on_train_epoch_start(self):
        self.train_seen = 0
        self.train_ops = 0

    @property
    def reports_train_size(self) -> bool:
        return any(getattr(t, "changes_size", False) for t in self.batch_transforms)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.repeat_batch and self._last_batch is not None:
            x, mix = self._last_batch  # the step rule's second pass sees the batch its first pass saw
        else:
            mix = None
            for transform in self.batch_transforms:
                x, mix = transform(x, y, mix, self)
            self._last_batch = (x, mix) if self.step_rule is not None else None
        self.train_size = x.shape[-1] if x.dim() == 4 else None
        self.train_seen += 0 if self.repeat_batch else len(y)  # images/s counts images; ops/s counts every pass
        self.train_ops += len(y) * (self.ops_by_size.get(self.train_size, self.ops_per_sample) or 0)
        return self._step((x, y), "train", mix)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        if self.step_rule is None or optimizer_closure is None:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        return self.step_rule.step(self, optimizer, optimizer_closure)

    def on_validation_epoch_start(self):
        if self.num_classes:
            self._val_correct = torch.zeros(self.num_classes, dtype=torch.long, device=self.device)
            self._val_total = torch.zeros(self.num_classes, dtype=torch.long, device=self.device)

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def on_validation_epoch_end(self):
        if not self.num_classes:
            return
        c, t = self._val_correct, self._val_total
        if self.trainer.world_size > 1:
            c, t = self.trainer.strategy.reduce(c, reduce_op="sum"), self.trainer.strategy.reduce(t, reduce_op="sum")
        self.val_per_class_ = (c.cpu(), t.cpu())

    def configure_optimizers(self):
        entry = get_optimizer(self.optimizer_name)
        settings = OptimizerSettings(self.lr, self.momentum, self.weight_decay, self.optimizer_args)
        scale = self.lr / self._base_lrs[-1]
        special, groups = [], []
        last = len(self.lr_groups) - 1
        for i, ((ps, _), lr) in enumerate(zip(self.lr_groups, self._base_lrs)):
            ps = [p for p in ps if p.requires_grad]
            mats = [p for p in ps if p.ndim > 1]
            own = entry.matrix_groups(i, i == last, mats, lr / self._base_lrs[-1], settings) \
                if entry.matrix_groups else None
            if own is not None:
                special += own
            else:
                groups.append({"params": mats, "lr": lr * scale})
            # No weight decay on biases and normalisation weights (1-D tensors): decaying them only shrinks the
            # scale BatchNorm re-learns at every step (the usual practice: timm, fast CIFAR recipes).
            groups.append({"params": [p for p in ps if p.ndim <= 1], "lr": lr * scale, "weight_decay": 0.0})
        # an entry's own groups first: the last group is the head's, whose LR the progress bar shows
        opt = entry.build([g for g in special + groups if g["params"]], settings)
        if self.schedule == "constant":
            return opt
        if self.schedule == "cosine" and not self.progress.budget_s:
            fn = warmup_cosine(self.total_steps, self.warmup_steps)  # unchanged epoch-count behaviour
        else:
            # one-cycle has its own warm-up; the course's step schedule has none
            warm = self.warmup_steps if self.schedule == "cosine" else 0
            prog = make_lambda(self.schedule, self.progress)

            def fn(step: int, _prog=prog, _warm=warm) -> float:
                return _prog(step) * (min(1.0, (step + 1) / _warm) if _warm else 1.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, fn)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
