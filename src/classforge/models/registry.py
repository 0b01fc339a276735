"""Backbone registry: every backbone is created by name and exposes its input spec and feature size.

Nothing downstream branches on model names: the training loop, the embedding cache, the Predictor and
the exporter only use `Backbone.spec`, `Backbone.feature_dim` and `Backbone.forward`.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn


class ClassforgeError(Exception):
    """An error with a message meant for the user (printed without a traceback by the CLI)."""


@dataclass(frozen=True)
class InputSpec:
    """What a backbone expects. Images: RGB, resized to `size`, normalised by mean/std.
    Audio: mono waveform at `sample_rate`, `clip_seconds` long (the backbone owns its front end)."""

    task: str  # "image" | "audio"
    size: int = 224  # image side in pixels
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    channels: int = 3
    sample_rate: int = 0  # audio only
    clip_seconds: float = 0.0  # audio only
    preprocess: tuple[str, ...] = ()  # classical image/audio ops run at load time (classforge.preprocess_ops)

    def to_dict(self) -> dict:
        d = asdict(self)
        if not d["preprocess"]:
            del d["preprocess"]  # runs without ops keep their model.json and embedding-cache keys
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "InputSpec":
        d = dict(d)
        for k in ("mean", "std", "preprocess"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


class Backbone(nn.Module):
    """A feature extractor: forward(x) -> (B, feature_dim). Subclasses set `spec` and `feature_dim`."""

    spec: InputSpec
    feature_dim: int
    weights_source: str = "random"

    def param_groups(self) -> list[list[nn.Parameter]]:
        """Parameters from input to output in a few blocks, for discriminative learning rates.
        The default is one group; backbones with stages override this."""
        return [list(self.parameters())]

    def set_grad_checkpointing(self, enable: bool = True) -> None:  # pragma: no cover - optional
        pass


@dataclass
class BackboneEntry:
    name: str
    task: str
    factory: Callable[..., Backbone]
    description: str = ""
    input_desc: str = ""
    weights_desc: str = "none (trained from scratch)"
    aliases: tuple[str, ...] = field(default_factory=tuple)
    budget_aware: bool = False  # factory takes num_classes / max_params / fit_budget (from-scratch CNNs)


_REGISTRY: dict[str, BackboneEntry] = {}


def register_backbone(name: str, task: str, description: str = "", input_desc: str = "",
                      weights_desc: str = "none (trained from scratch)", budget_aware: bool = False):
    """Decorator: `@register_backbone("cnn_lenet", "image")` over a factory
    `f(pretrained: bool, weights: str | None, **kwargs) -> Backbone`."""

    def deco(fn):
        _REGISTRY[name] = BackboneEntry(name, task, fn, description, input_desc, weights_desc,
                                        budget_aware=budget_aware)
        return fn

    return deco


def _load_builtin() -> None:
    # Importing registers. Audio and CNN modules are optional: a missing extra must not break images.
    from classforge.models import image  # noqa: F401

    for mod in ("classforge.models.small_cnn", "classforge.models.audio"):
        try:
            __import__(mod)
        except ImportError as e:  # pragma: no cover - depends on installed extras
            if "classforge" in str(e):
                continue
            raise


def registered() -> dict[str, BackboneEntry]:
    _load_builtin()
    return dict(_REGISTRY)


def create_backbone(name: str, pretrained: bool = True, weights: str | None = None, **kwargs) -> Backbone:
    """Create a backbone by name. Registered names first, then any timm model name (images)."""
    reg = registered()
    if name in reg:
        return reg[name].factory(pretrained=pretrained, weights=weights, **kwargs)
    from classforge.models import image

    if image.is_timm_model(name):
        return image.TimmBackbone(name, pretrained=pretrained, weights=weights, **kwargs)
    close = difflib.get_close_matches(name, list(reg), n=3)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ClassforgeError(
        f"Unknown backbone {name!r}.{hint} Run `classforge backbones` for the registered ones; "
        "any timm model name also works."
    )


def is_budget_aware(name: str) -> bool:
    e = registered().get(name)
    return bool(e and e.budget_aware)


def backbone_task(name: str) -> str:
    reg = registered()
    return reg[name].task if name in reg else "image"


class Classifier(nn.Module):
    """Backbone + linear head. The whole model a run saves (model.safetensors) and exports."""

    def __init__(self, backbone: Backbone, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Linear(backbone.feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.backbone(x)))


def count_params(model: nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": int(total), "trainable": int(trainable)}
