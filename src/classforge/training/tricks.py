"""Training tricks as registry entries: each declares its config keys, whether it acts only while the network
itself trains (so `--strategy linear`, a head on cached embeddings, has none of it), and its own check. Checks
run once, when the model is built and before any stage starts, and return normalised values (the config is not
changed in place). Below them, what the tricks do while training: batch transforms and a step rule."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from classforge.core.config import TrainConfig
from classforge.core.errors import ClassforgeError
from classforge.core.spec import InputSpec
from classforge.training.schedules import parse_progressive, size_at


@dataclass(frozen=True)
class Trick:
    name: str
    keys: tuple[str, ...]  # config keys it owns
    flag: str  # how the user turns it on
    what: str  # what it does, for the linear-strategy error
    instead: str  # what to do with --strategy linear
    check: Callable[[TrainConfig, InputSpec], dict[str, Any]]  # -> normalised values of its keys
    active: Callable[[TrainConfig], bool]


def _number(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _text_set(v) -> bool:
    return bool(v) and not (isinstance(v, str) and not v.strip())


def _check_sam(cfg: TrainConfig, spec: InputSpec) -> dict:
    rho = _number(cfg.sam)
    if math.isnan(rho) and cfg.sam not in (None, ""):
        raise ClassforgeError(f"--sam is the SAM radius, a number such as 0.05 (0: off); got {cfg.sam!r}")
    if not 0 <= rho <= 10:
        raise ClassforgeError(f"--sam is the SAM radius, between 0 (off) and 10 (0.05 is usual with SGD); got {cfg.sam}")
    return {"sam": rho}


def _check_cutout(cfg: TrainConfig, spec: InputSpec) -> dict:
    if not cfg.cutout:
        return {}
    if spec.task != "image":
        raise ClassforgeError("--cutout blanks a square of an image; for audio, masking on the log-mel "
                              "spectrogram is the equivalent (-a spec_augment=true)")
    if not 0 < cfg.cutout < spec.size:
        raise ClassforgeError(f"--cutout is the side of the blanked square in input pixels: between 1 and "
                              f"{spec.size - 1} for this {spec.size}x{spec.size} input, got {cfg.cutout}")
    return {}


def _check_mix(cfg: TrainConfig, spec: InputSpec) -> dict:
    """--mixup / --cutmix alphas (Beta(a, a); 0 = off) and --mix-prob; CutMix pastes boxes, so images only."""
    out = {}
    for key, flag in (("mixup", "--mixup"), ("cutmix", "--cutmix")):
        a = _number(getattr(cfg, key))
        if not 0 <= a <= 100:  # also NaN
            raise ClassforgeError(f"{flag} is the alpha of the Beta(alpha, alpha) mixing weight, from 0 (off) to 100 "
                                  f"(0.2-1 is usual); got {getattr(cfg, key)!r}")
        out[key] = a
    p = _number(cfg.mix_prob)
    if not 0 < p <= 1:
        raise ClassforgeError(f"--mix-prob is the share of training batches that are mixed, above 0 and at most 1; "
                              f"got {cfg.mix_prob!r}")
    out["mix_prob"] = p
    if out["cutmix"] and spec.task != "image":
        raise ClassforgeError("--cutmix pastes a box from another image; for audio use --mixup (blends whole clips)")
    return out


def _check_progressive(cfg: TrainConfig, spec: InputSpec) -> dict:
    if not _text_set(cfg.progressive_resize):
        return {}  # (not a string, e.g. the number 24: parse_progressive below says what it takes)
    if spec.task != "image":
        raise ClassforgeError("--progressive-resize downscales training images; audio inputs have no such option")
    parse_progressive(cfg.progressive_resize, spec.size)  # raises the clear error
    return {}


NETWORK_ONLY = "use --strategy scratch, finetune or two-stage"
TRICKS: dict[str, Trick] = {}


def register_trick(trick: Trick) -> Trick:
    TRICKS[trick.name] = trick
    return trick


register_trick(Trick("cutout", ("cutout",), "--cutout", "augments images while the network trains",
                     "use --views K for augmented embeddings", _check_cutout, lambda c: bool(c.cutout)))
register_trick(Trick("progressive_resize", ("progressive_resize",), "--progressive-resize",
                     "changes the images the network trains on", "use --strategy scratch or finetune",
                     _check_progressive, lambda c: _text_set(c.progressive_resize)))
register_trick(Trick("sam", ("sam",), "--sam", "changes how the network's weights are stepped", NETWORK_ONLY,
                     _check_sam, lambda c: bool(c.sam)))
register_trick(Trick("mixup", ("mixup", "cutmix", "mix_prob"), "--mixup", "mixes the inputs the network trains on",
                     NETWORK_ONLY, _check_mix, lambda c: bool(c.mixup)))
register_trick(Trick("cutmix", (), "--cutmix", "mixes the images the network trains on", NETWORK_ONLY,
                     lambda c, s: {}, lambda c: bool(c.cutmix)))


def check_tricks(cfg: TrainConfig, spec: InputSpec) -> TrainConfig:
    """Every trick's check, then the linear-strategy rule; returns the config with normalised values."""
    values: dict[str, Any] = {}
    for trick in TRICKS.values():
        values.update(trick.check(cfg, spec))
    cfg = cfg.replace(**values)
    if cfg.strategy == "linear":
        for trick in TRICKS.values():
            if trick.active(cfg):
                raise ClassforgeError(f"{trick.flag} {trick.what}; --strategy linear trains a head on cached "
                                      f"embeddings: {trick.instead}, or drop {trick.flag}")
    return cfg


# ------------------------------------------------------------------------------------ what they do while training
# Batch transforms: (x, y, mix, module) -> (x, mix), applied in order to every training batch (ClassifierModule).
def batch_mix(x: torch.Tensor, y: torch.Tensor, mixup: float, cutmix: float, prob: float,
              rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float] | None:
    """Mixup (Zhang et al. 2018) or CutMix (Yun et al. 2019) on a training batch, or None (this batch is not
    mixed: probability 1 - `prob`, or both alphas 0).

    Each sample is paired with another of the batch (a random permutation); lam ~ Beta(alpha, alpha). Mixup
    blends the whole inputs: lam * x + (1 - lam) * x[perm] (any shape: images, log-mels, waveforms). CutMix
    pastes a box covering about 1 - lam of the image (B, C, H, W) from the partner, its centre uniform and the
    box clipped at the border; lam is then the share of pixels actually kept. With both alphas > 0 each mixed
    batch picks one of the two at even odds. Returns (mixed x, y, y[perm], lam): the loss is
    lam * CE(y) + (1 - lam) * CE(y[perm]). x is not modified."""
    if (mixup <= 0 and cutmix <= 0) or rng.random() >= prob:
        return None
    mode = "mixup" if cutmix <= 0 else "cutmix" if mixup <= 0 else ("mixup", "cutmix")[int(rng.integers(2))]
    alpha = mixup if mode == "mixup" else cutmix
    lam = float(rng.beta(alpha, alpha))
    perm = torch.as_tensor(rng.permutation(len(y)), dtype=torch.long, device=y.device)
    if mode == "mixup":
        return x * lam + x[perm] * (1.0 - lam), y, y[perm], lam
    h, w = x.shape[-2:]
    r = math.sqrt(1.0 - lam)
    ch, cw = int(round(h * r)), int(round(w * r))
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    y0, y1 = max(cy - ch // 2, 0), min(cy - ch // 2 + ch, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx - cw // 2 + cw, w)
    out = x.clone()
    if y1 > y0 and x1 > x0:
        out[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
    return out, y, y[perm], 1.0 - (y1 - y0) * (x1 - x0) / (h * w)


@dataclass
class ProgressiveResize:
    """Training batches downscaled to `size` while training progress < `until` ([(until, size)], from
    schedules.parse_progressive); validation and the saved model stay at full size."""

    plan: list[tuple[float, int]]
    changes_size: bool = True

    def __call__(self, x, y, mix, module):
        size = size_at(self.plan, module.progress(module.global_step))
        if size is not None and x.shape[-1] != size:
            # antialiased bilinear downscale of the augmented batch: the whole image, smaller (as a smaller photo)
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return x, mix


@dataclass
class MixBatches:
    """Mixup / CutMix (batch_mix) on training batches; mix = (partner labels, lam) for the blended loss."""

    mixup: float
    cutmix: float
    prob: float
    seed: int = 0
    rng: np.random.Generator = field(init=False)

    def __post_init__(self):
        self.rng = np.random.default_rng(self.seed)

    def __call__(self, x, y, mix, module):
        mixed = batch_mix(x, y, self.mixup, self.cutmix, self.prob, self.rng)
        return (x, mix) if mixed is None else (mixed[0], (mixed[2], mixed[3]))


@dataclass
class SharpnessAware:
    """Sharpness-aware minimisation (Foret et al. 2021) with radius `rho` as a step rule: each step computes the
    gradient at w, moves to w + rho * g / ||g|| and takes the optimiser step with the gradient found there. The
    second forward-backward pass sees the same (mixed, resized) batch, logs nothing and leaves BatchNorm
    statistics alone."""

    rho: float

    def step(self, module, optimizer, closure):
        def sam_closure():
            loss = closure()  # forward + backward at w (logs the step's loss and accuracy)
            params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            if not params:
                return loss
            with torch.no_grad():
                norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
                scale = self.rho / (norm + 1e-12)
                eps = [p.grad * scale for p in params]
                for p, e in zip(params, eps):
                    p.add_(e)
            bns = [m for m in module.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
            momenta = [m.momentum for m in bns]
            module.repeat_batch = True
            try:
                for m in bns:
                    m.momentum = 0.0  # running statistics unchanged by the perturbed pass
                optimizer.zero_grad(set_to_none=False)
                closure()  # forward + backward at w + eps: the gradient the optimiser uses
            finally:
                module.repeat_batch = False
                for m, mom in zip(bns, momenta):
                    m.momentum = mom
                with torch.no_grad():
                    for p, e in zip(params, eps):
                        p.sub_(e)
            return loss

        optimizer.step(closure=sam_closure)


def batch_transforms(cfg: TrainConfig, plan: list[tuple[float, int]]) -> list:
    """The batch transforms a checked config asks for, in the order they apply (resize, then mix)."""
    out: list = []
    if plan:
        out.append(ProgressiveResize(plan))
    if cfg.mixup or cfg.cutmix:
        out.append(MixBatches(cfg.mixup, cfg.cutmix, cfg.mix_prob, cfg.seed))
    return out


def step_rule(cfg: TrainConfig):
    return SharpnessAware(cfg.sam) if cfg.sam else None
