"""Backbone registry: every backbone is created by name and exposes its input spec and feature size.

Nothing downstream branches on model names: the training loop, the embedding cache, the Predictor and
the exporter only use `Backbone.spec`, `Backbone.feature_dim` and `Backbone.forward`.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from classforge.core.errors import ClassforgeError
from classforge.core.spec import InputSpec

__all__ = ["Backbone", "BackboneEntry", "Classifier", "ClassforgeError", "InputSpec", "count_params",
           "create_backbone", "default_backbone", "entry", "register_backbone", "register_fallback", "registered"]


class Backbone(nn.Module):
    """A feature extractor: forward(x) -> (B, feature_dim). Subclasses set `spec` and `feature_dim`, and
    override what they support; callers ask these, never the backbone's name."""

    spec: InputSpec
    feature_dim: int
    weights_source: str = "random"
    bf16_safe: bool = True  # False: bf16 autocast loses accuracy (fp32 engines are used instead)
    tta_modes: tuple[str, ...] = ("none",)  # test-time views the backbone averages inside forward()
    tta: str = "none"  # the mode in use
    builds_onnx_graph: bool = False  # onnx_graph() builds the network as ONNX without torch's exporter

    def param_groups(self) -> list[list[nn.Parameter]]:
        """Parameters from input to output in a few blocks, for discriminative learning rates.
        The default is one group; backbones with stages override this."""
        return [list(self.parameters())]

    def set_grad_checkpointing(self, enable: bool = True) -> None:  # pragma: no cover - optional
        pass

    def onnx_graph(self) -> bytes | None:
        """Backbones with `builds_onnx_graph`: the network in eval mode as a serialised ONNX model, input "input",
        output "logits" (the features), built without torch's exporter."""
        return None

    def init_from_data(self, x: torch.Tensor) -> bool:
        """Data-dependent initialisation from (N, ...) normalised training inputs before training from scratch;
        True when it changed anything."""
        return False


@dataclass
class BackboneEntry:
    """What a registered backbone declares, so that nothing outside models/ guesses from its name."""

    name: str
    task: str
    factory: Callable[..., Backbone]
    description: str = ""
    input_desc: str = ""
    weights_desc: str = "none (trained from scratch)"
    pretrained: bool = False  # has pretrained weights: --strategy auto picks linear, else scratch
    budget_aware: bool = False  # factory takes num_classes / max_params / fit_budget (from-scratch CNNs)
    stage_args: bool = False  # takes widths= / depth= / block= per stage (searchable architecture)
    default_for: str | None = None  # the task ("image" / "audio") this backbone is the default of
    # config defaults per strategy (keys of TrainConfig), applied where the user left the key at its default
    recipes: dict[str, dict[str, Any]] = field(default_factory=dict)
    default_args: dict[str, Any] = field(default_factory=dict)  # architecture arguments unless given
    train_args: dict[str, Any] = field(default_factory=dict)  # added when the network trains with augmentation
    small_args: dict[str, Any] = field(default_factory=dict)  # a small random instance (tests, smoke runs)
    # what --strategy auto may try with this backbone under a time budget: (rank, strategy, config overrides)
    # entries, one strategy may appear with different overrides; candidates run by rank, cheapest and most
    # promising first
    auto: list[tuple[int, str, dict[str, Any]]] = field(default_factory=list)

    def recipe(self, strategy: str) -> dict[str, Any]:
        return dict(self.recipes.get(strategy, {}))


_REGISTRY: dict[str, BackboneEntry] = {}
# Factories for names outside the registry (e.g. any timm model): fn(name) -> factory or None.
_FALLBACKS: list[Callable[[str], Callable[..., Backbone] | None]] = []
_INFRASTRUCTURE = {"registry", "anatomy", "weights"}
_families_imported = False


def _families() -> dict[str, BackboneEntry]:
    """The registry, once every module of this package has been imported: each family module registers its
    backbones when imported, so a new backbone is one new file. Done on first use rather than when the package is
    imported, so that the package's torch-free modules (e.g. efficientnet_lite_plan) load without torch. A family
    whose optional extra is missing (e.g. transformers for AST) registers what it can and is otherwise skipped."""
    global _families_imported
    if not _families_imported:
        _families_imported = True
        package = __name__.rpartition(".")[0]
        for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
            if info.name in _INFRASTRUCTURE or info.name.startswith("_"):
                continue
            try:
                importlib.import_module(f"{package}.{info.name}")
            except ImportError as e:  # pragma: no cover - depends on installed extras
                if "classforge" in str(e):
                    raise
    return _REGISTRY


def register_backbone(name: str, task: str, description: str = "", input_desc: str = "",
                      weights_desc: str = "none (trained from scratch)", **declared):
    """Decorator: `@register_backbone("cnn_lenet", "image")` over a factory
    `f(pretrained: bool, weights: str | None, **kwargs) -> Backbone`; `declared` sets BackboneEntry fields
    (pretrained, budget_aware, stage_args, default_for, recipes, default_args, train_args, small_args, auto)."""

    def deco(fn):
        _REGISTRY[name] = BackboneEntry(name, task, fn, description, input_desc, weights_desc, **declared)
        return fn

    return deco


def register_fallback(fn: Callable[[str], Callable[..., Backbone] | None]) -> None:
    _FALLBACKS.append(fn)


def registered() -> dict[str, BackboneEntry]:
    return dict(_families())


def entry(name: str) -> BackboneEntry | None:
    return _families().get(name)


def default_backbone(task: str) -> str:
    for e in _families().values():
        if e.default_for == task:
            return e.name
    raise ClassforgeError(f"No default backbone for {task} (is the extra for {task} installed?)")


def create_backbone(name: str, pretrained: bool = True, weights: str | None = None, **kwargs) -> Backbone:
    """Create a backbone by name. Registered names first, then the fallbacks (any timm model name)."""
    return factory_for(name)(pretrained=pretrained, weights=weights, **kwargs)


def factory_for(name: str) -> Callable[..., Backbone]:
    """The factory of a backbone name, or a ClassforgeError with the closest names (nothing is built)."""
    if name in _families():
        return _REGISTRY[name].factory
    for fallback in _FALLBACKS:
        factory = fallback(name)
        if factory is not None:
            return factory
    close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ClassforgeError(
        f"Unknown backbone {name!r}.{hint} Run `classforge backbones` for the registered ones; "
        "any timm model name also works."
    )


def is_budget_aware(name: str) -> bool:
    e = _families().get(name)
    return bool(e and e.budget_aware)


def backbone_task(name: str) -> str:
    return _REGISTRY[name].task if name in _families() else "image"


class Classifier(nn.Module):
    """Backbone + linear head. The whole model a run saves (model.safetensors) and exports. `open_set` (set once
    training is over, see models.open_set) scores how foreign an input is; forward() stays logits only."""

    def __init__(self, backbone: Backbone, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Linear(backbone.feature_dim, num_classes)
        self.open_set: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.backbone(x)))


def count_params(model: nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    out = {"total": int(total), "trainable": int(trainable)}
    head = getattr(model, "head", None)
    if isinstance(head, nn.Module):  # what a linear run trains: the backbone stays frozen
        out["head"] = int(sum(p.numel() for p in head.parameters()))
    return out
