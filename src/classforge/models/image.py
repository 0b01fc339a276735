"""Image backbones from timm: any timm model name, ImageNet weights from the Hugging Face Hub or a local file."""

from __future__ import annotations

import os
import time

import torch

from classforge.core.errors import ClassforgeError
from classforge.core.spec import InputSpec
from classforge.models.registry import Backbone, register_backbone, register_fallback
from classforge.models.weights import hub_reachable, load_state_file


def is_timm_model(name: str) -> bool:
    import timm

    return bool(timm.list_models(name)) or name in timm.list_models(pretrained=True)


def go_offline() -> None:
    """Hub downloads look only in the local cache from now on (a failure then takes 0.2 s, not minutes of
    retries). huggingface_hub reads HF_HUB_OFFLINE once, when it is imported (timm imports it), so its own flag
    is set too."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import huggingface_hub.constants as hub_constants
    except ImportError:  # pragma: no cover - timm brings huggingface_hub
        return
    hub_constants.HF_HUB_OFFLINE = True


def _split_groups(params: list, n: int = 3) -> list[list]:
    k = max(1, len(params) // n)
    groups = [params[i * k:(i + 1) * k] for i in range(n - 1)] + [params[(n - 1) * k:]]
    return [g for g in groups if g]


class TimmBackbone(Backbone):
    """Any timm model as a pooled-feature extractor (num_classes=0)."""

    def __init__(self, name: str, pretrained: bool = True, weights: str | None = None,
                 arch: str | None = None, spec_override: dict | None = None, **kwargs):
        super().__init__()
        import timm

        arch = arch or name
        self.name = name
        extra = {}
        if "dinov2" in arch or arch.startswith(("vit_", "deit_", "eva")):
            extra["dynamic_img_size"] = True
        if weights is not None:
            self.model = timm.create_model(arch, pretrained=False, num_classes=0, **extra)
            self._load(load_state_file(weights), str(weights))
            self.weights_source = f"file:{weights}"
        elif pretrained:
            self.model = self._from_hub(arch, extra)
            self.weights_source = f"hub:{arch}"
        else:
            self.model = timm.create_model(arch, pretrained=False, num_classes=0, **extra)
            self.weights_source = "random"
        cfg = timm.data.resolve_data_config({}, model=self.model)
        spec = dict(task="image", size=int(cfg["input_size"][-1]), mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                    interpolation=cfg.get("interpolation", "bicubic"), crop_pct=float(cfg.get("crop_pct", 0.875)))
        if "dinov2" in arch:
            spec["size"] = 224  # the hub cfg says 518 px; 224 with dynamic size is the practical CPU choice
        spec.update(spec_override or {})
        self.spec = InputSpec(**spec)
        # what forward() returns: after a pre-logits projection where the model has one (MobileNetV3's conv_head
        # maps num_features 576 to 1024), num_features where not
        self.feature_dim = int(getattr(self.model, "head_hidden_size", None) or self.model.num_features)

    def _from_hub(self, arch: str, extra: dict):
        import timm

        t0 = time.time()
        if not hub_reachable():
            go_offline()
        try:
            return timm.create_model(arch, pretrained=True, num_classes=0, **extra)
        except Exception as e:  # noqa: BLE001 - any hub/network failure becomes one clear message
            raise ClassforgeError(
                f"Could not get pretrained weights for {arch!r} ({type(e).__name__} after {time.time() - t0:.1f}s; "
                "offline or not in the local cache). Pass a local checkpoint with --weights PATH "
                "(.safetensors or a state-dict .pth), or --no-pretrained to start from random weights."
            ) from None

    def _load(self, sd: dict, source: str) -> None:
        own = self.model.state_dict()
        sd = {k.removeprefix("module.").removeprefix("model."): v for k, v in sd.items()}
        usable = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
        if len(usable) < 0.5 * len(own):
            raise ClassforgeError(
                f"{source}: only {len(usable)} of {len(own)} tensors match {self.name!r}; wrong architecture?"
            )
        self.model.load_state_dict(usable, strict=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)  # (B, feature_dim)

    def param_groups(self):
        return _split_groups([p for p in self.model.parameters()], 3)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)


def _timm_factory(arch: str):
    def factory(pretrained: bool = True, weights: str | None = None, **kw) -> Backbone:
        return TimmBackbone(arch, pretrained=pretrained, weights=weights, **kw)

    return factory


# A few popular timm names listed by `classforge backbones` (any other timm name works too).
for _arch, _desc, _inp in [
    ("resnet18", "ResNet-18", "3x224x224"),
    ("resnet34", "ResNet-34", "3x224x224"),
    ("mobilenetv3_small_100", "MobileNetV3-Small", "3x224x224"),
    ("deit_tiny_patch16_224", "DeiT-Tiny ViT", "3x224x224"),
    ("vit_small_patch14_dinov2", "DINOv2 ViT-S/14", "3x224x224"),
    ("convnext_atto", "ConvNeXt-Atto", "3x224x224"),
]:
    register_backbone(_arch, "image", description=_desc, input_desc=_inp,
                      weights_desc="Hugging Face Hub (online) or --weights PATH", pretrained=True)(_timm_factory(_arch))


def _any_timm_model(name: str):
    return _timm_factory(name) if is_timm_model(name) else None


register_fallback(_any_timm_model)
