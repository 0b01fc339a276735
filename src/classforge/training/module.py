"""LightningModules: what to compute. The Trainer (run.py) decides how: devices, precision, callbacks."""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset


class FileDataset(Dataset):
    """Decoded files held in memory (decoded once), transformed per access: train or eval."""

    def __init__(self, raws: list, labels: list[int], preprocessor, train: bool):
        self.raws, self.labels, self.pre, self.train = raws, labels, preprocessor, train

    def __len__(self) -> int:
        return len(self.raws)

    def __getitem__(self, i):
        raw = self.raws[i]
        x = self.pre.train(raw) if self.train else self.pre.eval(raw)
        return x, self.labels[i]


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
    backbone is unfrozen. The LR schedule is warm-up + cosine over `total_steps`."""

    def __init__(self, model: nn.Module, lr_groups: list[tuple[list, float]], weight_decay: float = 0.05,
                 total_steps: int = 1000, warmup_steps: int = 0, class_weights: torch.Tensor | None = None,
                 label_smoothing: float = 0.0, channels_last: bool = False, optimizer: str = "adamw",
                 schedule: str = "cosine"):
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
        self.register_buffer("class_weights", class_weights if class_weights is not None else torch.empty(0))
        self.lr = lr_groups[-1][1]  # the LR finder tunes this one (the head's); others keep their ratios
        self._base_lrs = [lr for _, lr in lr_groups]

    def forward(self, x):
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)

    def _step(self, batch, stage: str):
        x, y = batch
        logits = self(x)
        w = self.class_weights if self.class_weights.numel() else None
        loss = F.cross_entropy(logits.float(), y, weight=w,
                               label_smoothing=self.label_smoothing if stage == "train" else 0.0)
        acc = (logits.argmax(-1) == y).float().mean()
        self.log(f"{stage}_loss", loss, prog_bar=True, on_step=False, on_epoch=True, sync_dist=True, batch_size=len(y))
        self.log(f"{stage}_acc", acc, prog_bar=True, on_step=False, on_epoch=True, sync_dist=True, batch_size=len(y))
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def configure_optimizers(self):
        scale = self.lr / self._base_lrs[-1]
        groups = [{"params": [p for p in ps if p.requires_grad], "lr": lr * scale}
                  for (ps, _), lr in zip(self.lr_groups, self._base_lrs)]
        groups = [g for g in groups if g["params"]]
        if self.optimizer_name == "sgd":
            opt = torch.optim.SGD(groups, momentum=0.9, nesterov=True, weight_decay=self.weight_decay)
        else:
            opt = torch.optim.AdamW(groups, weight_decay=self.weight_decay)
        if self.schedule == "constant":
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(self.total_steps, self.warmup_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
