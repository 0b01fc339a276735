"""The one place defaults live. A run's resolved config is written to RUN_DIR/config.yaml and can be read back
(`classforge train --config config.yaml`); unknown keys are rejected with a "did you mean" suggestion."""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from classforge.core.errors import ClassforgeError


class _Loader(yaml.SafeLoader):
    """yaml.SafeLoader without YAML 1.1's base-60 numbers (dropped in YAML 1.2): `24:0.5` and `1:30` stay text
    instead of becoming 1440.5 and 90. Other scalars resolve as with yaml.safe_load."""


_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {ch: [(tag, rx) for tag, rx in rs if tag not in (_INT, _FLOAT)]
                                   for ch, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(_INT, re.compile(r"""^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)
    |[-+]?0x[0-9a-fA-F_]+)$""", re.X), list("-+0123456789"))
_Loader.add_implicit_resolver(_FLOAT, re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?
    |\.[0-9_]+(?:[eE][-+][0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.X), list("-+0123456789."))


def load_yaml(text: str):
    """Parse a config file or a --set/-a value: yaml.safe_load, except that 24:0.5 stays the text it looks like."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


@dataclass
class TrainConfig:
    # data
    data: str = ""
    labels_csv: str | None = None
    label_from_name: str | None = None
    bins: str | None = None  # "0,3,10,20" -> numeric labels binned into [0,3), [3,10), ...
    classes: str | None = None  # "a,b,c" subset
    max_classes: int | None = None
    min_size: int = 8  # images smaller than this (either side) are skipped
    max_pixels: int = 89_478_485  # Pillow's decompression-bomb limit; larger images are skipped
    # split
    split: str = "0.7,0.2,0.1"
    group_by: str | None = None  # regex on the path; group = first capture group (or whole match)
    test_groups: str | None = None  # "artwork,icons": these groups form the test split
    split_file: str | None = None
    resplit: bool = False  # ignore train/val/test folders and split anew (e.g. to hold out groups)
    seed: int = 0
    near_dup_distance: int = 18  # bits of the 255-bit perceptual hash within which images are near duplicates
    # model
    backbone: str = "auto"  # auto: efficientnet_lite0 for images, efficientat_mn04 for audio
    weights: str | None = None
    pretrained: bool = True
    strategy: str = "auto"  # auto (linear; scratch for backbones without weights) | linear | finetune | two-stage | scratch
    dropout: float = 0.0
    backbone_args: dict[str, Any] = field(default_factory=dict)  # e.g. {"widths": [16, 32, 64], "block": "residual"}
    max_params: int | None = None  # refuse a model (backbone + head) with more parameters
    fit_budget: bool = False  # from-scratch CNNs: scale widths down to fit --max-params instead of refusing
    # optimisation
    epochs: int = 0  # 0 = strategy default
    batch_size: int = 32
    lr: str = "default"  # "default" | "auto" (LR finder) | float
    backbone_lr_mult: float | None = None  # backbone LR = lr x this when fine-tuning; None: 0.1 (0.3 for audio)
    weight_decay: float = 0.05  # AdamW's; with SGD the default becomes 5e-4 (classic L2 strength)
    optimizer: str = "auto"  # auto (sgd for the step schedule, else adamw) | adamw | sgd | a registered name
    optimizer_args: dict[str, Any] = field(default_factory=dict)  # the chosen optimizer's own options
    momentum: float = 0.9  # SGD momentum
    schedule: str = "cosine"  # cosine (warm-up + cosine) | step (1, 1/10, 1/100 over 50/25/25%) | onecycle | constant
    compile: bool = False  # torch.compile the network for training
    threads: int = 0  # torch intra-op threads while training (0 = torch's default, one per core)
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.0
    sam: float = 0.0  # sharpness-aware minimisation radius rho (e.g. 0.05 with SGD; 0 = off): 2 forward-backward passes per step
    ema: float = 0.0  # decay of an exponential moving average of the weights used for validation and the result (0 = off)
    patience: int = 5
    time_budget: str | None = None  # "10m", "1h", "90s"
    precision: str = "auto"  # auto | 32-true | bf16-mixed
    grad_checkpointing: bool = False
    augment: str = "light"  # none | light | strong
    cutout: int = 0  # images, full-fit training: zero (= the mean pixel) a random square of this side in each training image
    mixup: float = 0.0  # full-fit training: blend pairs of training inputs, lam ~ Beta(a, a) (Zhang et al. 2018; 0 = off)
    cutmix: float = 0.0  # images, full-fit training: paste a box from another image, lam ~ Beta(a, a) (Yun et al. 2019; 0 = off)
    mix_prob: float = 1.0  # share of training batches mixed when mixup or cutmix is on
    progressive_resize: str = ""  # images, full-fit training: "24:0.5" = train on images downscaled to 24 px until 50% of training
    views: int = 1  # augmented views per image for cached embeddings (linear)
    extract_engine: str = "auto"  # frozen-backbone forward for cached embeddings: auto | torch | onnx
    eval_engine: str = "auto"  # final evaluation: auto (onnx where extraction resolves to onnx) | torch | onnx
    augment_to: int = 0  # audio: N augmented variants per training recording, written to the cache
    balance: str | None = None  # oversample | weights | augment-to N
    preprocess: str | None = None  # images: "autocontrast,gamma=0.8,blur=1.0" (classforge.data.ops)
    # hardware (passed to Lightning)
    accelerator: str = "auto"
    devices: str = "auto"
    num_nodes: int = 1
    dist_strategy: str = "auto"
    num_workers: int = 0
    # output
    out: str = ""
    resume: bool = False
    top_k: int = 3
    track: str | None = None  # "mlflow": also log the run to an MLflow store (classforge.training.tracking)
    track_uri: str | None = None  # MLflow tracking URI [sqlite:///mlflow.db, artifacts in ./mlruns]
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        check_keys(d, cls)
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        d = load_yaml(Path(path).read_text()) or {}
        if not isinstance(d, dict):
            raise ClassforgeError(f"{path}: expected a mapping of config keys")
        return cls.from_dict(d)

    def replace(self, **overrides) -> "TrainConfig":
        check_keys(overrides, type(self))
        return dataclasses.replace(self, **overrides)


STRATEGIES = ("linear", "finetune", "two-stage", "scratch")
# Each strategy's recipe, used where the config leaves epochs / lr / backbone_lr_mult at their defaults (a
# backbone's own recipe, BackboneEntry.recipes, comes first).
DEFAULT_EPOCHS = {"linear": 60, "finetune": 8, "two-stage": 6, "scratch": 30}
DEFAULT_LR = {"linear": 3e-3, "finetune": 1e-3, "two-stage": 3e-4, "scratch": 2e-3}
DEFAULT_BACKBONE_LR_MULT = 0.1  # fine-tuning: backbone LR = lr x this


def check_keys(d: dict, cls) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    for k in d:
        if k not in known:
            close = difflib.get_close_matches(k, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ClassforgeError(f"Unknown config key {k!r}.{hint}")


def parse_duration(s: str | None) -> float | None:
    """'90s', '10m', '1.5h', '600' -> seconds."""
    if s in (None, "", "none"):
        return None
    s = str(s).strip().lower()
    mult = {"s": 1, "m": 60, "h": 3600}
    try:
        if s[-1] in mult:
            return float(s[:-1]) * mult[s[-1]]
        return float(s)
    except ValueError:
        raise ClassforgeError(f"Cannot read duration {s!r}; use e.g. 90s, 10m, 1h") from None


def parse_fractions(s: str) -> tuple[float, float, float]:
    try:
        parts = [float(x) for x in str(s).split(",")]
    except ValueError:
        raise ClassforgeError(f"--split expects three fractions like 0.7,0.2,0.1, got {s!r}") from None
    if len(parts) != 3 or any(p < 0 for p in parts) or abs(sum(parts) - 1) > 1e-6 or parts[0] <= 0:
        raise ClassforgeError(f"--split expects three non-negative fractions summing to 1, got {s!r}")
    return parts[0], parts[1], parts[2]
