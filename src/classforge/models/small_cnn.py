"""Small CNNs trained from scratch under a parameter budget: the `cnn` family, its presets, and `capsnet`.

`cnn` stacks stages of one block kind each (`block=`): plain (conv-BN-ReLU x depth, then max-pool), plainpool
(the pool before the stage's last BN and ReLU: the same functions on a quarter of the values), plainres (one-conv
residual units after the first conv), pooled (pool first, airbench-style, with an optional frozen patch-whitening
stem), flat (no pooling), or residual (ResNet-20-style basic blocks with parameter-free shortcuts). `act=` swaps
the activation and `se=R` ends each stage with a squeeze-and-excitation gate. The budget counts the head a
`Classifier` adds: `max_params` refuses a model that does not fit, `fit_budget` scales the widths to fit.
docs/small-cnns.md describes each option with the measured results.

Residual additions, shortcuts and gates are modules (`Add`, `Shortcut`, `Gate`) so that the anatomy
(`classforge.models.anatomy`) lists them as rows; custom modules report their own operations through
``anatomy_fn()`` / ``anatomy_ops(inputs, output)``.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from classforge.core.errors import ClassforgeError
from classforge.core.spec import InputSpec
from classforge.models.registry import Backbone, register_backbone
from classforge.models.weights import load_state_file

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def cifar_spec(input_size: int = 32, in_channels: int = 3) -> InputSpec:
    """CIFAR-10 statistics; for other channel counts (1 = grayscale / log-mel) their channel average."""
    if in_channels == 3:
        mean, std = CIFAR10_MEAN, CIFAR10_STD
    else:
        mean = (round(sum(CIFAR10_MEAN) / 3, 4),) * in_channels
        std = (round(sum(CIFAR10_STD) / 3, 4),) * in_channels
    return InputSpec(task="image", size=int(input_size), mean=mean, std=std, interpolation="bilinear",
                     crop_pct=1.0, channels=int(in_channels))


# --------------------------------------------------------------------------------------------------------
# Building blocks that make every operation visible to forward hooks


class Add(nn.Module):
    """Elementwise sum of two tensors (the residual addition), as a module so the anatomy counts it."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b

    def anatomy_fn(self) -> str:
        return "Add (residual)"

    def anatomy_ops(self, inputs, output) -> dict[str, int]:
        return {"adds": output.numel()}


class Shortcut(nn.Module):
    """Parameter-free "option A" shortcut: subsample by `stride`, zero-pad channels from `cin` to `cout`.
    Pure data movement: no arithmetic counted."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.cin, self.cout, self.stride = cin, cout, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.cout > self.cin:
            x = F.pad(x, (0, 0, 0, 0, 0, self.cout - self.cin))  # pads dim 1 (channels) at the end
        return x

    def anatomy_fn(self) -> str:
        return f"Shortcut A s{self.stride} +{self.cout - self.cin}ch zero-pad"

    def anatomy_ops(self, inputs, output) -> dict[str, int]:
        return {}


class Scale(nn.Module):
    """Multiply by a constant (a temperature on the features, hence on the logits of the Linear head)."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = float(factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor

    def anatomy_fn(self) -> str:
        return f"Scale x{self.factor:g}"

    def anatomy_ops(self, inputs, output) -> dict[str, int]:
        return {"mults": output.numel()}


class PatchWhiten(nn.Conv2d):
    """A k×k convolution (no padding) whose filters whiten the image's k×k patches: the eigenvectors of the
    patch covariance of training images, each divided by sqrt(eigenvalue + eps), and each also negated, so
    that the ReLU after it keeps all information: 2·C·k² output channels. `fit(x)` sets them from a batch
    of normalised training images before training; afterwards the filters get no gradient (they are saved and
    counted as parameters like any weight; the bias learns unless `train_bias` is False). The network then starts
    from decorrelated inputs, which is what makes the fast CIFAR recipes converge in few epochs (airbench).

    With `train_bias=False` nothing before the first trained conv needs a gradient, so backpropagation stops
    there: the first conv's input gradient (the largest tensor of the backward pass at full resolution) and the
    stem's own backward are skipped, about a fifth of a training step of `cnn_fast_256k` on a CPU."""

    def __init__(self, in_channels: int = 3, kernel_size: int = 2, eps: float = 5e-4, train_bias: bool = True):
        super().__init__(in_channels, 2 * in_channels * kernel_size * kernel_size, kernel_size, bias=True)
        self.eps = eps
        self.train_bias = train_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias if self.train_bias else self.bias.detach()
        return self._conv_forward(x, self.weight.detach(), bias)

    @torch.no_grad()
    def fit(self, x: torch.Tensor) -> None:
        """x: (N, C, H, W) normalised training images (a few thousand are plenty)."""
        c, k = self.in_channels, self.kernel_size[0]
        d = c * k * k
        cov = torch.zeros(d, d, dtype=torch.float64)
        mean = torch.zeros(d, dtype=torch.float64)
        n = 0
        for chunk in x.float().split(512):
            # (B, C, H', W', k, k) -> (B*H'*W', C*k*k), features ordered like the conv weight (c, i, j)
            p = chunk.unfold(2, k, 1).unfold(3, k, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, d).double()
            cov += p.T @ p
            mean += p.sum(0)
            n += len(p)
        mean /= n
        cov = cov / n - torch.outer(mean, mean)
        eigval, eigvec = torch.linalg.eigh(cov)
        filters = (eigvec.T / torch.sqrt(eigval.clamp(min=0) + self.eps)[:, None]).reshape(d, c, k, k)
        self.weight.copy_(torch.cat([filters, -filters]).to(self.weight.dtype))
        self.bias.zero_()


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus shortcut, then ReLU (He et al. 2016)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        if stride == 1 and cin == cout:
            self.shortcut: nn.Module = nn.Identity()
        elif cout >= cin:
            self.shortcut = Shortcut(cin, cout, stride)
        else:  # narrowing: zero-padding cannot help, project with a 1x1 conv (option B)
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.add = Add()
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(self.add(out, self.shortcut(x)))


class ResUnit(nn.Module):
    """One-conv residual unit at a fixed width: ReLU(x + BN(Conv3x3(x))) (or GELU/SiLU, `act`). No parameters
    beyond the conv and its BN; the BN's scale starts at zero, so the unit starts as act(x) (Goyal et al. 2017)."""

    def __init__(self, w: int, k: int, pad: int, bn: bool, act: str = "relu"):
        super().__init__()
        self.conv = nn.Conv2d(w, w, k, 1, pad, bias=not bn)
        self.bn = nn.BatchNorm2d(w) if bn else nn.Identity()
        self.add = Add()
        self.act = _activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.add(x, self.bn(self.conv(x))))


class Gate(nn.Module):
    """x * g with g of shape (B, C, 1, 1): the channel gating of squeeze-and-excitation, as a module so the
    anatomy counts its multiplications."""

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return x * g

    def anatomy_fn(self) -> str:
        return "Gate (x * channel weights)"

    def anatomy_ops(self, inputs, output) -> dict[str, int]:
        return {"mults": output.numel()}


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018): the channel means of the map -> 1x1 conv to C/r -> ReLU -> 1x1
    conv to C -> sigmoid, and the map's channels multiplied by those weights, one weight per image and channel.
    2*C*C/r + C/r + C parameters. Both convs get the He initialisation of the other convs, biases zero."""

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.squeeze = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.relu = nn.ReLU(inplace=True)
        self.expand = nn.Conv2d(hidden, channels, 1)
        self.sigmoid = nn.Sigmoid()
        self.gate = Gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H, W)
        return self.gate(x, self.sigmoid(self.expand(self.relu(self.reduce(self.squeeze(x))))))


ACTIVATIONS = ("relu", "gelu", "silu")


def _activation(name: str) -> nn.Module:
    return {"relu": lambda: nn.ReLU(inplace=True), "gelu": nn.GELU, "silu": lambda: nn.SiLU(inplace=True)}[name]()


# --------------------------------------------------------------------------------------------------------
# The CNN family

BLOCKS = ("plain", "plainpool", "plainres", "pooled", "flat", "residual")


def _per_stage(value: int | Sequence[int], n: int, what: str) -> list[int]:
    if isinstance(value, int):
        return [value] * n
    value = [int(v) for v in value]
    if len(value) != n:
        raise ClassforgeError(f"{what} has {len(value)} entries but there are {n} stages (widths)")
    return value


def _parse_ints(value: Any, what: str) -> list[int]:
    """Accept [16, 32, 64], (16, 32, 64), "16,32,64" or "16x32x64" (from a CLI or a YAML file)."""
    if value is None:
        return []
    if isinstance(value, str):
        parts = [p for p in value.replace("x", ",").split(",") if p.strip()]
        try:
            value = [int(p) for p in parts]
        except ValueError:
            raise ClassforgeError(f"{what} must be integers like 16,32,64; got {value!r}") from None
    if isinstance(value, int):
        value = [value]
    out = [int(v) for v in value]
    if any(v < 1 for v in out):
        raise ClassforgeError(f"{what} must be positive, got {out}")
    return out


TTA_VIEWS = {"none": 1, "flip": 2, "flip-shift": 6, "flip-shift8": 18, "flip-shift24": 50}  # forward passes per image
SHIFT_RADIUS = {"flip-shift8": 1, "flip-shift24": 2}  # modes that average every shift up to this many pixels
TTA_MODES = tuple(TTA_VIEWS)


def _parse_blocks(block: Any, n: int) -> list[str]:
    """One block type for every stage ("pooled"), or one per stage ("pooled,pooled,plain" or a list)."""
    kinds = [b.strip() for b in block.split(",")] if isinstance(block, str) else [str(b) for b in block]
    for k in kinds:
        if k not in BLOCKS:
            raise ClassforgeError(f"block must be one of {', '.join(BLOCKS)} (or one per stage, comma-separated), "
                                  f"got {block!r}")
    if len(kinds) == 1:
        return kinds * n
    if len(kinds) != n:
        raise ClassforgeError(f"block lists {len(kinds)} types but there are {n} stages (widths)")
    return kinds


def _conv_stage(kind: str, cin: int, w: int, d: int, k: int, pad: int, bn: bool, side: int, act: str = "relu",
                se: int = 0):
    """One plain, plainpool, plainres, pooled or flat stage -> (module, channels out, side out).

    plain: d x (Conv -> [BN] -> ReLU), then a 2x2 max-pool. plainpool: (d - 1) x (Conv -> [BN] -> ReLU), then
    Conv -> 2x2 max-pool -> [BN] -> ReLU. plainres: as plain, but convs 2..d are residual
    units (ReLU(x + BN(Conv(x))), `ResUnit`): same parameters, one addition per output value more.
    pooled: Conv -> 2x2 max-pool -> [BN] -> ReLU, then d - 1 x (Conv -> [BN] -> ReLU) at the pooled size.
    flat: d x (Conv -> [BN] -> ReLU), no pooling. `act` replaces every ReLU (gelu, silu); `se` > 0 ends the stage
    with a squeeze-and-excitation gate of reduction `se` (on the pooled map)."""
    layers: list[nn.Module] = []
    for j in range(d):
        if kind == "plainres" and j > 0:
            if pad * 2 != k - 1:
                raise ClassforgeError(f"block=plainres needs 'same' padding (padding={(k - 1) // 2} for "
                                      f"kernel_size={k}), got padding={pad}")
            layers.append(ResUnit(w, k, pad, bn, act))
            continue
        layers.append(nn.Conv2d(cin if j == 0 else w, w, k, 1, pad, bias=not bn))
        side = side + 2 * pad - k + 1
        if (kind == "pooled" and j == 0) or (kind == "plainpool" and j == d - 1):
            layers.append(nn.MaxPool2d(2))
            side //= 2
        if bn:
            layers.append(nn.BatchNorm2d(w))
        layers.append(_activation(act))
    if kind in ("plain", "plainres"):  # plainpool has pooled before its last BN
        layers.append(nn.MaxPool2d(2))
        side //= 2
    if se:
        layers.append(SqueezeExcite(w, se))
    return nn.Sequential(*layers), w, side


class SmallCNN(Backbone):
    """A from-scratch CNN: stages of plain or residual blocks, then global pooling or flatten + hidden FCs.

    forward(x: (B, in_channels, H, W)) -> (B, feature_dim), feature_dim = hidden[-1] if hidden else
    widths[-1] (global pooling) or the flattened map size (no pooling, no hidden).
    """

    tta_modes = TTA_MODES

    def __init__(self, widths: Sequence[int] = (32, 64, 128), depth: int | Sequence[int] = 1,
                 block: str = "plain", kernel_size: int = 3, padding: int | None = None,
                 batch_norm: bool = True, global_pool: bool | str = True, hidden: Sequence[int] = (),
                 dropout: float = 0.0, input_size: int = 32, in_channels: int = 3, stem: str = "none",
                 feature_scale: float = 1.0, tta: str = "none", whiten_bias: str = "frozen", act: str = "relu",
                 se: int = 0):
        super().__init__()
        widths = _parse_ints(widths, "widths")
        hidden = _parse_ints(hidden, "hidden")
        if not widths:
            raise ClassforgeError("widths must list at least one stage width")
        blocks = _parse_blocks(block, len(widths))
        if "residual" in blocks and len(set(blocks)) > 1:
            raise ClassforgeError(f"block=residual cannot be mixed with other block types per stage, got {block!r}")
        block = blocks[0] if len(set(blocks)) == 1 else ",".join(blocks)
        if stem not in ("none", "whiten"):
            raise ClassforgeError(f"stem must be 'none' or 'whiten', got {stem!r}")
        if stem == "whiten" and blocks[0] == "residual":
            raise ClassforgeError("stem=whiten is for the plain, plainpool, plainres, pooled and flat blocks (residual nets have a conv stem)")
        if whiten_bias not in ("train", "frozen"):
            raise ClassforgeError(f"whiten_bias must be 'train' or 'frozen', got {whiten_bias!r}")
        if tta not in TTA_MODES:
            raise ClassforgeError(f"tta must be one of {', '.join(TTA_MODES)}, got {tta!r}")
        if act not in ACTIVATIONS:
            raise ClassforgeError(f"act must be one of {', '.join(ACTIVATIONS)}, got {act!r}")
        try:
            se = int(se)
        except (TypeError, ValueError):
            raise ClassforgeError(f"se is the squeeze-and-excitation reduction (0 = none, e.g. 8), got {se!r}") from None
        if se < 0:
            raise ClassforgeError(f"se is the squeeze-and-excitation reduction (0 = none, e.g. 8), got {se}")
        if (act != "relu" or se) and "residual" in blocks:
            raise ClassforgeError("act= and se= are for the plain, plainpool, pooled and flat blocks, not residual")
        if global_pool not in (True, False, "avg", "max"):
            raise ClassforgeError(f"global_pool must be true/false, 'avg' or 'max', got {global_pool!r}")
        depths = _per_stage(depth, len(widths), "depth")
        if any(d < 1 for d in depths):
            raise ClassforgeError(f"depth must be >= 1 per stage, got {depths}")
        self.spec = cifar_spec(input_size, in_channels)
        self.config = {"widths": widths, "depth": depths, "block": block, "kernel_size": kernel_size,
                       "padding": padding, "batch_norm": batch_norm, "global_pool": global_pool, "hidden": hidden,
                       "dropout": dropout, "input_size": input_size, "in_channels": in_channels, "stem": stem,
                       "feature_scale": feature_scale, "tta": tta, "whiten_bias": whiten_bias, "act": act, "se": se}
        self.tta = tta
        pad = kernel_size // 2 if padding is None else int(padding)
        side = int(input_size)

        stages: list[nn.Module] = []
        cin = in_channels
        if stem == "whiten":
            whiten = PatchWhiten(in_channels, 2, train_bias=whiten_bias == "train")
            stages.append(nn.Sequential(whiten, _activation(act)))
            cin, side = whiten.out_channels, side - 1
        if blocks[0] != "residual":
            for w, d, kind in zip(widths, depths, blocks):
                stage, cin, side = _conv_stage(kind, cin, w, d, kernel_size, pad, batch_norm, side, act, se)
                if side < 1:
                    raise ClassforgeError(f"input_size {input_size} is too small for {len(widths)} stages "
                                          f"of {kernel_size}x{kernel_size} convs and 2x2 pooling")
                stages.append(stage)
        else:
            stem = nn.Sequential(nn.Conv2d(cin, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                 nn.ReLU(inplace=True))
            cin = widths[0]
            for i, (w, d) in enumerate(zip(widths, depths)):
                res_blocks: list[nn.Module] = [stem] if i == 0 else []
                for j in range(d):
                    stride = 2 if (i > 0 and j == 0) else 1
                    res_blocks.append(BasicBlock(cin, w, stride))
                    cin = w
                    side = (side - 1) // stride + 1
                stages.append(nn.Sequential(*res_blocks))
        self.stages = nn.ModuleList(stages)

        if global_pool == "max":
            self.pool: nn.Module = nn.AdaptiveMaxPool2d(1)
            flat = cin
        elif global_pool or blocks[0] == "residual":
            self.pool = nn.AdaptiveAvgPool2d(1)
            flat = cin
        else:
            self.pool = nn.Identity()
            flat = cin * side * side
        self.flatten = nn.Flatten(1)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        fcs: list[nn.Module] = []
        for h in hidden:
            fcs += [nn.Linear(flat, h), nn.ReLU(inplace=True)]
            if dropout > 0:
                fcs.append(nn.Dropout(dropout))
            flat = h
        self.fc = nn.Sequential(*fcs)
        self.scale = Scale(feature_scale) if feature_scale != 1.0 else nn.Identity()
        self.feature_dim = int(flat)
        self._init_weights()

    def _init_weights(self) -> None:
        if any(p.is_meta for p in self.parameters()):
            return  # shape-only copy built to count parameters (fit_widths): init would only cost time
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and not isinstance(m, PatchWhiten):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Zero-init the last BN of each residual branch: every block starts as identity (Goyal et al. 2017).
        for m in self.modules():
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)
            elif isinstance(m, ResUnit) and isinstance(m.bn, nn.BatchNorm2d):
                nn.init.zeros_(m.bn.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tta != "none" and not self.training:
            # Test-time augmentation inside the model (so predict, export and serving all do it). "flip": the mean
            # of the features of the image and of its mirror image, i.e. the mean of both logits under the Linear
            # head. "flip-shift" adds the image moved one pixel up-left and one pixel down-right (reflect-padded),
            # each with its mirror: 0.5 x the mean of the two unshifted views + 0.5 x the mean of the four shifted.
            # "flip-shift8": the plain mean over the image moved to each of its 8 one-pixel neighbours and itself,
            # each with its mirror (18 views, 9x the cost of "flip"; about +0.15 test points over "flip-shift" on
            # three 60-minute CIFAR-10 runs, benchmarks/RESULTS.md). "flip-shift24": the same over the 5 x 5 positions
            # up to two pixels away (50 views).
            b = x.shape[0]
            h, w = x.shape[-2:]
            r = SHIFT_RADIUS.get(self.tta, 0)
            if r:
                xp = F.pad(x, (r, r, r, r), mode="reflect")  # (B, C, H+2r, W+2r)
                views = [xp[..., i:i + h, j:j + w] for i in range(2 * r + 1) for j in range(2 * r + 1)]
            else:
                views = [x]
                if self.tta == "flip-shift":
                    xp = F.pad(x, (1, 1, 1, 1), mode="reflect")
                    views += [xp[..., :h, :w], xp[..., 2:, 2:]]  # content moved down-right / up-left by one pixel
            views = [u for v in views for u in (v, v.flip(3))]  # each view and its mirror
            f = self._features(torch.cat(views)).view(len(views), b, -1)  # (V, B, D)
            if self.tta == "flip-shift":
                return 0.5 * f[:2].mean(0) + 0.5 * f[2:].mean(0)
            return f.mean(0)
        return self._features(x)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)  # (B, C, H, W), H and W halve per stage after the first (residual) or per stage (plain)
        x = self.drop(self.flatten(self.pool(x)))  # (B, C) or (B, C*H*W)
        return self.scale(self.fc(x))  # (B, feature_dim)

    @property
    def whiten(self) -> PatchWhiten | None:
        """The patch-whitening stem (the first stage's first layer), if the net has one."""
        first = self.stages[0][0] if len(self.stages) and isinstance(self.stages[0], nn.Sequential) else None
        return first if isinstance(first, PatchWhiten) else None

    def init_from_data(self, x: torch.Tensor) -> bool:
        """Data-dependent initialisation before training from scratch (x: normalised training images).
        Fits the patch-whitening stem when there is one; returns whether anything was fitted."""
        if self.whiten is None:
            return False
        self.whiten.fit(x)
        return True

    def param_groups(self) -> list[list[nn.Parameter]]:
        groups = [list(s.parameters()) for s in self.stages] + [list(self.fc.parameters())]
        return [g for g in groups if g]


# --------------------------------------------------------------------------------------------------------
# Capsule network


class Squash(nn.Module):
    """v = |s|² / (1 + |s|²) · s / |s| over the last dim (Sabour et al. 2017, eq. 1)."""

    def __init__(self, eps: float = 1e-8):
        super().__init__()
        self.eps = eps

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        n2 = (s * s).sum(-1, keepdim=True)  # (..., 1)
        return s * (n2 / (1 + n2) / torch.sqrt(n2 + self.eps))

    def anatomy_fn(self) -> str:
        return "Squash"

    def anatomy_ops(self, inputs, output) -> dict[str, int]:
        # per capsule of dim d: |s|² = d mults + (d-1) adds; 1+n2 and n2+eps = 2 adds; 2 divisions + 1 sqrt
        # (other); the final scaling = d mults.
        d = output.shape[-1]
        n = output.numel() // d
        return {"mults": n * 2 * d, "adds": n * (d + 1), "other": n * 3}


class PrimaryCaps(nn.Module):
    """A conv whose output channels are `types` groups of `dim`-vectors: (B, types*H*W, dim), squashed."""

    def __init__(self, cin: int, types: int, dim: int, kernel_size: int = 9, stride: int = 2):
        super().__init__()
        self.types, self.dim = types, dim
        self.conv = nn.Conv2d(cin, types * dim, kernel_size, stride)
        self.squash = Squash()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.conv(x)  # (B, types*dim, H, W)
        b, _, h, w = u.shape
        u = u.reshape(b, self.types, self.dim, h, w).permute(0, 1, 3, 4, 2).reshape(b, self.types * h * w, self.dim)
        return self.squash(u)  # (B, N_in, dim)


class DigitCaps(nn.Module):
    """Fully-connected capsules with routing-by-agreement (Sabour et al. 2017, procedure 1).

    Each input capsule i predicts every output capsule j with its own matrix: û_j|i = W_ij u_i. Routing
    logits b start at 0; for `iters` rounds: c = softmax_j(b), s_j = Σ_i c_ij û_j|i, v_j = squash(s_j),
    b += û_j|i · v_j. Gradients flow through the final round only (û is detached inside the agreement
    updates), as in most reference implementations: this halves the memory of the backward pass.
    """

    def __init__(self, n_in: int, n_out: int, d_in: int, d_out: int, iters: int = 3):
        super().__init__()
        self.n_in, self.n_out, self.d_in, self.d_out, self.iters = n_in, n_out, d_in, d_out, iters
        self.weight = nn.Parameter(torch.randn(n_in, n_out, d_out, d_in) * (1.0 / math.sqrt(d_in)))
        self.softmax = nn.Softmax(dim=-1)
        self.squash = Squash()

    def forward(self, u: torch.Tensor) -> torch.Tensor:  # u: (B, N_in, D_in)
        u_hat = torch.einsum("ijdk,bik->bijd", self.weight, u)  # (B, N_in, N_out, D_out)
        u_det = u_hat.detach()
        logits = u.new_zeros(u.shape[0], self.n_in, self.n_out)  # (B, N_in, N_out)
        for r in range(self.iters):
            c = self.softmax(logits)  # coupling coefficients over output capsules
            last = r == self.iters - 1
            s = (c.unsqueeze(-1) * (u_hat if last else u_det)).sum(1)  # (B, N_out, D_out)
            v = self.squash(s)
            if not last:
                logits = logits + (u_det * v.unsqueeze(1)).sum(-1)  # agreement (B, N_in, N_out)
        return v  # (B, N_out, D_out)

    def anatomy_fn(self) -> str:
        return f"DigitCaps {self.n_in}x{self.d_in}D -> {self.n_out}x{self.d_out}D, {self.iters} routing iters"

    def anatomy_ops(self, inputs, output) -> dict[str, int]:
        # Softmax and Squash are child modules with their own rows; counted here: the predictions û, the
        # weighted sums s (every round) and the agreement updates (every round but the last).
        ni, no, di, do, r = self.n_in, self.n_out, self.d_in, self.d_out, self.iters
        mults = ni * no * do * di + r * ni * no * do + (r - 1) * ni * no * do
        adds = ni * no * do * (di - 1) + r * (ni - 1) * no * do + (r - 1) * (ni * no * (do - 1) + ni * no)
        return {"mults": mults, "adds": adds, "macs": ni * no * do * di}


class CapsNet(Backbone):
    """Conv(ReLU) → PrimaryCaps → DigitCaps with dynamic routing, scaled down for small inputs on a CPU.

    Sabour et al. use 256 conv channels and 32×8D primary capsules on 28 px MNIST (8.2M parameters, with a
    reconstruction decoder); the defaults here are 64 channels and 8×8D primary capsules (≈1.0M at 32 px).

    Features: the flattened digit-capsule pose vectors, (B, num_capsules × capsule_dim) — not only their
    lengths — so the Linear head a `Classifier` adds sees the pose as well as the presence of each
    capsule. Training therefore uses the usual cross-entropy on the head instead of the paper's margin loss
    and decoder; `capsule_lengths()` gives the paper's class scores when num_capsules equals the classes.
    """

    def __init__(self, input_size: int = 32, in_channels: int = 3, conv_channels: int = 64,
                 kernel_size: int = 9, primary_types: int = 8, primary_dim: int = 8, num_capsules: int = 10,
                 capsule_dim: int = 16, routing_iters: int = 3):
        super().__init__()
        self.spec = cifar_spec(input_size, in_channels)
        side = input_size - kernel_size + 1
        side = (side - kernel_size) // 2 + 1
        if side < 1:
            raise ClassforgeError(f"capsnet needs inputs larger than {2 * kernel_size - 1}px, got {input_size}")
        self.conv = nn.Conv2d(in_channels, conv_channels, kernel_size)
        self.relu = nn.ReLU(inplace=True)
        self.primary = PrimaryCaps(conv_channels, primary_types, primary_dim, kernel_size, 2)
        self.digits = DigitCaps(primary_types * side * side, num_capsules, primary_dim, capsule_dim, routing_iters)
        self.flatten = nn.Flatten(1)
        self.feature_dim = num_capsules * capsule_dim

    def capsule_lengths(self, x: torch.Tensor) -> torch.Tensor:
        return self.digits(self.primary(self.relu(self.conv(x)))).norm(dim=-1)  # (B, num_capsules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.digits(self.primary(self.relu(self.conv(x))))  # (B, num_capsules, capsule_dim)
        return self.flatten(v)  # (B, num_capsules * capsule_dim)

    def param_groups(self) -> list[list[nn.Parameter]]:
        return [list(self.conv.parameters()), list(self.primary.parameters()), list(self.digits.parameters())]


# --------------------------------------------------------------------------------------------------------
# Budget, weights, factories


def head_params(feature_dim: int, num_classes: int | None) -> int:
    return 0 if not num_classes else feature_dim * num_classes + num_classes


def total_params(backbone: Backbone, num_classes: int | None) -> int:
    """Parameters of Classifier(backbone, num_classes): backbone + Linear head."""
    return sum(p.numel() for p in backbone.parameters()) + head_params(backbone.feature_dim, num_classes)


def _head_note(num_classes: int | None) -> str:
    if num_classes:
        return f"including the Linear head for {num_classes} classes"
    return "backbone only: pass num_classes to count the head too"


def check_budget(name: str, backbone: Backbone, num_classes: int | None, max_params: int | None) -> None:
    if max_params is None:
        return
    n = total_params(backbone, num_classes)
    if n > max_params:
        raise ClassforgeError(
            f"{name} has {n:,} parameters ({_head_note(num_classes)}), over --max-params {max_params:,} "
            f"by {n - max_params:,}. Use --fit-budget {max_params} to scale its widths down to the largest "
            "model that fits, or pass smaller widths."
        )


def _scaled(cfg: dict, m: float) -> dict:
    out = dict(cfg)
    out["widths"] = [max(1, round(w * m)) for w in cfg["widths"]]
    out["hidden"] = [max(1, round(h * m)) for h in cfg["hidden"]]
    return out


def _meta_count(cfg: dict, num_classes: int | None) -> int:
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        return total_params(SmallCNN(**cfg), num_classes)


def fit_widths(cfg: dict, budget: int, num_classes: int | None, name: str = "cnn") -> dict:
    """The config whose widths (and hidden sizes), scaled by one multiplier then filled greedily one channel
    at a time, give the largest model with at most `budget` parameters (head included)."""
    cfg = dict(cfg, widths=_parse_ints(cfg["widths"], "widths"), hidden=_parse_ints(cfg.get("hidden", ()), "hidden"))

    def fits(c: dict) -> bool:
        return _meta_count(c, num_classes) <= budget

    smallest = _scaled(cfg, 0.0)
    if not fits(smallest):
        raise ClassforgeError(
            f"--fit-budget {budget:,} is too small for {name}: even with 1 channel per layer it has "
            f"{_meta_count(smallest, num_classes):,} parameters ({_head_note(num_classes)})."
        )
    lo, hi = 0.0, 1.0
    while fits(_scaled(cfg, hi)) and hi < 1024:
        lo, hi = hi, hi * 2
    for _ in range(24):  # parameter count is non-decreasing in the multiplier
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fits(_scaled(cfg, mid)) else (lo, mid)
    best = _scaled(cfg, lo)
    # Greedy fill of what rounding left: one more channel per layer, last (widest) first, while it fits.
    keys = [("hidden", i) for i in reversed(range(len(best["hidden"])))] + \
           [("widths", i) for i in reversed(range(len(best["widths"])))]
    improved = True
    while improved:
        improved = False
        for key, i in keys:
            trial = {**best, key: list(best[key])}
            trial[key][i] += 1
            if fits(trial):
                best, improved = trial, True
    return best


def load_backbone_weights(backbone: Backbone, path: str) -> None:
    """Load a safetensors (or plain state-dict) file of the backbone; a Classifier's file works too
    (its `backbone.` prefix is stripped, its head ignored)."""
    sd = load_state_file(path)
    if any(k.startswith("backbone.") for k in sd):
        sd = {k.removeprefix("backbone."): v for k, v in sd.items() if k.startswith("backbone.")}
    try:
        backbone.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ClassforgeError(f"{path} does not match this architecture: {str(e).splitlines()[0]}") from None
    backbone.weights_source = f"file:{path}"


_CNN_KEYS = ("widths", "depth", "block", "kernel_size", "padding", "batch_norm", "global_pool", "hidden",
             "dropout", "input_size", "in_channels", "stem", "feature_scale", "tta", "whiten_bias", "act", "se")
_BUDGET_KEYS = ("fit_budget", "max_params", "num_classes")


def _check_kwargs(name: str, kwargs: dict, allowed: Sequence[str]) -> None:
    for k in kwargs:
        if k not in allowed:
            close = difflib.get_close_matches(k, allowed, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ClassforgeError(f"{name} does not take {k!r}.{hint} It takes: {', '.join(allowed)}")


def build_cnn(name: str, base: dict, weights: str | None = None, fit_budget: int | None = None,
              max_params: int | None = None, num_classes: int | None = None, **overrides) -> SmallCNN:
    """A preset `base` config updated by user overrides, fitted to / checked against the budget."""
    _check_kwargs(name, overrides, _CNN_KEYS + _BUDGET_KEYS)
    cfg = {**base, **overrides}
    if fit_budget is not None:
        budget = min(int(fit_budget), int(max_params)) if max_params is not None else int(fit_budget)
        cfg = fit_widths(cfg, budget, num_classes, name)
    model = SmallCNN(**cfg)
    check_budget(name, model, num_classes, max_params)
    if weights:
        load_backbone_weights(model, weights)
    return model


PRESETS: dict[str, dict] = {
    # The course tutorial's LeNet: conv 6@5x5 → ReLU → pool → conv 16@5x5 → ReLU → pool → fc 120 → fc 84.
    "cnn_lenet": {"widths": [6, 16], "depth": 1, "block": "plain", "kernel_size": 5, "padding": 0,
                  "batch_norm": False, "global_pool": False, "hidden": [120, 84]},
    # Three conv-BN-ReLU-pool stages and global average pooling: ≈95K parameters with a 10-class head.
    "cnn_small": {"widths": [32, 64, 128], "depth": 1, "block": "plain"},
    # ResNet-20 for CIFAR (He et al. 2016): 3 stages × 3 basic blocks, widths 16/32/64.
    "cnn_resnet20": {"widths": [16, 32, 64], "depth": 3, "block": "residual"},
    # ResNet-20 with a 60-wide last stage: fits 256K parameters with a 10-class head.
    "cnn_resnet_256k": {"widths": [16, 32, 60], "depth": 3, "block": "residual"},
    # Pool-first stages on a whitened stem (the airbench shape), scaled to 256K parameters with a 10-class head:
    # about half the multiply-adds of the ResNet-20 and 2.7x its training images/s on this CPU.
    "cnn_fast_256k": {"widths": [32, 64, 112], "depth": 2, "block": "pooled", "stem": "whiten",
                      "global_pool": "max", "feature_scale": 1 / 9},
    # The same layers and parameters in VGG order (both convs of a stage at full size, then the 2x2 max-pool):
    # twice the multiply-adds of cnn_fast_256k per image, so half its epochs in a time budget, but more accurate
    # per epoch: at a fixed parameter budget the spare compute of a fast CPU goes into larger feature maps.
    "cnn_plain_256k": {"widths": [32, 64, 112], "depth": 2, "block": "plain", "stem": "whiten",
                       "global_pool": "max", "feature_scale": 1 / 9},
}
_DESCRIPTIONS = {
    "cnn_lenet": "LeNet-5 as in the PyTorch CIFAR-10 tutorial (62,006 params with a 10-class head)",
    "cnn_small": "3-stage conv-BN-ReLU-maxpool CNN for 32px, global avg pool (<100K params)",
    "cnn_resnet20": "ResNet-20 for CIFAR (3x3 basic blocks, widths 16/32/64, ~0.27M params)",
    "cnn_resnet_256k": "ResNet-20 with widths 16/32/60: under 256K params with a 10-class head",
    "cnn_fast_256k": "Whitened 2x2 stem + 3 pool-first stages (32/64/112, 2 convs each), global max pool: "
                     "under 256K params, the fastest to train on a CPU",
    "cnn_plain_256k": "cnn_fast_256k's layers in VGG order (conv-conv-pool per stage, 32/64/112): same 251K params, "
                      "2x the operations per image; with cutout 12 and flip-shift8 TTA, test 0.8965-0.9002 (three seeds) after "
                      "60 min of training on 2 AVX-512-BF16 cores, 0.9055-0.9062 (two seeds) with -a block=plainpool "
                      "-a act=gelu -a se=8 (255,756 params)",
}


# What `--backbone cnn` builds when no architecture argument is given: the family measured best for 32-px inputs
# (CIFAR-10 under 256K parameters in 60 CPU minutes, docs/small-cnns.md): VGG-order stages on a whitened stem, the
# pool inside each stage, GELU, squeeze-excite. `--max-params N` scales its widths to use the whole budget.
MEASURED_FAMILY = {**PRESETS["cnn_plain_256k"], "block": "plainpool", "act": "gelu", "se": 8}
_ARCH_KEYS = set(_CNN_KEYS) - {"input_size", "in_channels", "tta"}
# ... and how that family was trained: one-cycle SGD with Nesterov momentum, label smoothing, crop + flip + cutout
# (benchmarks/cifar10/budget.py RECIPE); applied to `--strategy scratch` where the user left a key at its default
MEASURED_RECIPE = {"optimizer": "sgd", "lr": "0.2", "momentum": 0.9, "weight_decay": 5e-4, "schedule": "onecycle",
                   "label_smoothing": 0.2, "augment": "cifar", "cutout": 12, "batch_size": 256}


@register_backbone("cnn", "image", description="From-scratch CNN. Alone (or with --max-params N, scaled to use it): "
                   "the family and recipe measured best on CIFAR-10; or built from widths=, depth=, "
                   "block=plain|plainpool|plainres|pooled|flat|residual (or one per stage: pooled,pooled,plain), "
                   "act=relu|gelu|silu, se= (squeeze-excite reduction), fit_budget=",
                   input_desc="in_channels x input_size^2 (3x32x32)", budget_aware=True, stage_args=True,
                   recipes={"scratch": MEASURED_RECIPE})
def cnn(pretrained: bool = False, weights: str | None = None, **kwargs) -> SmallCNN:
    # `pretrained` is accepted for the common factory signature; these nets have no published weights.
    if _ARCH_KEYS & set(kwargs):
        return build_cnn("cnn", PRESETS["cnn_small"], weights=weights, **kwargs)
    if kwargs.get("max_params") and not kwargs.get("fit_budget"):
        kwargs["fit_budget"] = kwargs["max_params"]  # the measured family, as large as the budget allows
    return build_cnn("cnn", MEASURED_FAMILY, weights=weights, **kwargs)


def _preset_factory(name: str):
    def factory(pretrained: bool = False, weights: str | None = None, **kwargs) -> SmallCNN:
        return build_cnn(name, PRESETS[name], weights=weights, **kwargs)

    factory.__name__ = name
    return factory


for _name in PRESETS:
    register_backbone(_name, "image", description=_DESCRIPTIONS[_name],
                      input_desc="3x32x32 (input_size=, in_channels=)", budget_aware=True,
                      stage_args=True)(_preset_factory(_name))

_CAPS_KEYS = ("input_size", "in_channels", "conv_channels", "kernel_size", "primary_types", "primary_dim",
              "num_capsules", "capsule_dim", "routing_iters")


@register_backbone("capsnet", "image", description="Capsule network with dynamic routing (Sabour 2017), "
                   "small: features = flattened digit capsules", input_desc="3x32x32 (28-32px)", budget_aware=True)
def capsnet(pretrained: bool = False, weights: str | None = None, max_params: int | None = None,
            num_classes: int | None = None, fit_budget: int | None = None, **kwargs) -> CapsNet:
    _check_kwargs("capsnet", kwargs, _CAPS_KEYS)
    if fit_budget is not None:
        raise ClassforgeError("fit_budget scales the cnn* backbones; for capsnet set conv_channels / "
                              "primary_types instead (or use --max-params to check a size)")
    if num_classes and "num_capsules" not in kwargs:
        kwargs["num_capsules"] = num_classes  # one digit capsule per class, as in the paper
    model = CapsNet(**kwargs)
    check_budget("capsnet", model, num_classes, max_params)
    if weights:
        load_backbone_weights(model, weights)
    return model
