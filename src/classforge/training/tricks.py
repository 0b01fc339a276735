"""Training tricks as registry entries: each declares its config keys, whether it acts only while the network
itself trains (so `--strategy linear`, a head on cached embeddings, has none of it), and its own check. Checks
run once, before any data is read or any stage starts, and return normalised values (the config is not changed
in place)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from classforge.core.config import TrainConfig
from classforge.core.errors import ClassforgeError
from classforge.core.spec import InputSpec
from classforge.training.schedules import parse_progressive


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
