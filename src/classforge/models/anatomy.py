"""The full anatomy of a network: one row per sub-layer with its shapes, weights and operation counts.

`describe(model, input_shape)` runs one sample (batch 1, eval mode, no grad) through the model with forward
hooks on every *row module*: leaf modules, modules of the counted types below even when they have children
(timm's BatchNormAct2d), and any module with an ``anatomy_ops`` method (then its children get rows of their
own, so a custom module counts only what it does itself). Rows are numbered in the order the modules are
called; a module called twice gives two rows. ``nn.Identity`` and plain containers (Sequential, ModuleList,
ModuleDict, even when empty) are skipped.

Counting conventions (per sample; every count is exact for the shapes met, not an estimate)
--------------------------------------------------------------------------------------------
Operations are split into **adds** (additions and subtractions), **mults** (multiplications),
**max** (comparisons: max, min, clamp) and **other** (divisions, exp, log, sqrt, transcendental functions).

- Conv (1d/2d/3d), K = Cin/groups × kernel volume: mults = out_elems × K;
  adds = out_elems × (K − 1), + out_elems if it has a bias. MACs = out_elems × K.
- ConvTranspose: mults = in_elems × Cout/groups × kernel volume; adds = mults − out_elems (+ out_elems with a bias).
- Linear, K = in_features: mults = out_elems × K; adds = out_elems × (K − 1) (+ out_elems with a bias).
  MACs = out_elems × K. "macs" in the totals sums the MACs of conv and linear layers and those a custom
  module reports for its own matmul-like work (the capsule predictions û = W u of `DigitCaps`): what
  `torch.utils.flop_counter.FlopCounterMode` counts, at 2 FLOPs per MAC.
- MaxPool with a k-element window: (k − 1) max per output (padding included, as the window has k slots).
  Adaptive max-pool: (window size − 1) per output with the exact adaptive windows.
- AvgPool with a k-element window: (k − 1) adds + 1 mult (by the constant 1/k) per output. Adaptive
  average pooling the same with its exact windows (global pooling of H×W: H·W − 1 adds + 1 mult per channel).
- ReLU: 1 max per element. ReLU6 / Hardtanh: 2 max. LeakyReLU / PReLU: 1 mult + 1 max.
  Hardsigmoid: 1 add + 2 max + 1 mult; Hardswish: 1 add + 2 max + 2 mults.
  Sigmoid, Tanh, GELU, ELU, SELU, Softplus, Mish: 1 other per element; SiLU: 1 other + 1 mult.
- Softmax over n entries: per element 1 exp + 1 division (2 other), per row n − 1 adds (the sum).
  LogSoftmax: per element 1 exp (other) + 1 subtraction (add), per row n − 1 adds + 1 log (other).
  (The max subtracted for numerical stability is an implementation detail and is not counted.)
- BatchNorm in eval: folded into a scale and a shift, 1 mult + 1 add per element.
- LayerNorm / GroupNorm / InstanceNorm, per normalised group of n elements: mean (n − 1 adds, 1 mult),
  centring (n adds), variance (n mults, n − 1 adds, 1 mult), + eps (1 add), rsqrt (1 other), scaling (n mults),
  and with an affine transform n mults + n adds.
- Residual addition (`classforge.models.small_cnn.Add`): 1 add per output element.
- Capsules (`small_cnn.Squash`, `small_cnn.DigitCaps`): see their ``anatomy_ops``; the routing's softmax and
  squash calls are rows of their own, one per routing iteration.
- Dropout (eval), Flatten, Unflatten, reshapes, zero-padding shortcuts: 0 operations.
- A module may report its own counts with ``anatomy_ops(inputs, output) -> {"adds", "mults", "max",
  "other", "macs"}`` (called with batch-1 tensors; "macs" ⊆ its mults) and its description with
  ``anatomy_fn() -> str``.
- Anything else is listed with zero operations and named in `Anatomy.notes`. Hooks see modules only:
  functional operations inside a non-row module (an inline ``x + y`` in someone else's residual block,
  attention matmuls) are invisible; `Anatomy.reference_macs` (from FlopCounterMode) shows such gaps.

Parameters: a row shows the parameters its module owns directly; the total is every parameter of the model.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from classforge.core.config import load_yaml
from classforge.core.errors import ClassforgeError
from classforge.models.registry import Classifier, create_backbone

OPS = ("adds", "mults", "max", "other")

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)
_COUNTED = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm) + _NORMS


@dataclass
class Row:
    n: int
    name: str
    fn: str
    input_shape: list[list[int]]
    output_shape: list[int]
    weight_shape: list[int] | None
    bias_shape: list[int] | None
    params: int
    adds: int = 0
    mults: int = 0
    max: int = 0
    other: int = 0
    macs: int = 0
    counted: bool = True

    @property
    def ops(self) -> int:
        return self.adds + self.mults + self.max + self.other


def _shape(s: Sequence[int] | None) -> str:
    return "" if s is None else ("x".join(str(d) for d in s) if len(s) else "scalar")


@dataclass
class Anatomy:
    """The rows and totals of one `describe` call. Shapes are per sample (no batch dimension)."""

    title: str
    input_shape: tuple[int, ...]
    rows: list[Row]
    totals: dict[str, int]
    reference_macs: int | None = None  # FlopCounterMode's total FLOPs / 2 (None if it could not run)
    notes: list[str] = field(default_factory=list)

    def table(self, max_rows: int | None = None):
        """A rich Table for the terminal (totals in the footer)."""
        from rich.table import Table

        t = Table(title=f"{self.title} — input {_shape(self.input_shape)}", show_footer=True,
                  caption="\n".join(self.notes) or None, caption_justify="left")
        cols = [("n", "right"), ("name", "left"), ("Fn", "left"), ("input", "left"), ("output", "left"),
                ("weight", "left"), ("bias", "left"), ("params", "right"), ("adds", "right"),
                ("mults", "right"), ("max", "right"), ("other", "right")]
        footer = {"name": "total", "params": self.totals["params"], **{k: self.totals[k] for k in OPS}}
        for c, justify in cols:
            f = footer.get(c, "")
            t.add_column(c, justify=justify, footer=f"{f:,}" if isinstance(f, int) else f)
        rows = self.rows if max_rows is None or len(self.rows) <= max_rows else self.rows[:max_rows]
        for r in rows:
            t.add_row(str(r.n), r.name, r.fn + ("" if r.counted else " (?)"),
                      " + ".join(_shape(s) for s in r.input_shape), _shape(r.output_shape),
                      _shape(r.weight_shape), _shape(r.bias_shape), f"{r.params:,}",
                      *(f"{getattr(r, k):,}" for k in OPS))
        if len(rows) < len(self.rows):
            t.add_row("…", f"{len(self.rows) - len(rows)} more rows", *[""] * 10)
        return t

    def _summary_lines(self) -> list[str]:
        tot = self.totals
        lines = [(f"params {tot['params']:,} | MACs (conv+linear) {tot['macs']:,} | "
                  f"ops {tot['ops']:,} = adds {tot['adds']:,} + mults {tot['mults']:,} + "
                  f"max {tot['max']:,} + other {tot['other']:,}")]
        if self.reference_macs is not None:
            lines.append(f"torch FlopCounterMode: {self.reference_macs:,} MACs (2 FLOPs each)")
        return lines

    def summary(self) -> str:
        return "\n".join(self._summary_lines())

    def to_dicts(self) -> list[dict[str, Any]]:
        out = []
        for r in self.rows:
            d = asdict(r)
            d["input_shape"] = " + ".join(_shape(s) for s in r.input_shape)
            for k in ("output_shape", "weight_shape", "bias_shape"):
                d[k] = _shape(d[k])
            d["ops"] = r.ops
            out.append(d)
        return out

    def to_csv(self, path: str | Path) -> Path:
        """One line per row, then a `total` line."""
        path = Path(path)
        rows = self.to_dicts()
        fields = list(rows[0]) if rows else ["n", "name", "params", *OPS, "macs", "ops"]
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)
            w.writerow({"n": "", "name": "total", **{k: v for k, v in self.totals.items() if k in fields}})
        return path

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps({
            "title": self.title, "input_shape": list(self.input_shape), "totals": self.totals,
            "reference_macs": self.reference_macs, "notes": self.notes, "rows": self.to_dicts(),
            "conventions": "see classforge.models.anatomy module docstring",
        }, indent=2))
        return path


# --------------------------------------------------------------------------------------------------------
# Per-module descriptions and operation counts


def _tuple(v, n: int) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def _compact(v: tuple) -> str:
    return str(v[0]) if len(set(v)) == 1 else "x".join(str(x) for x in v)


def _fn(m: nn.Module) -> str:
    name = type(m).__name__
    if hasattr(m, "anatomy_fn"):
        return m.anatomy_fn()
    if isinstance(m, nn.modules.conv._ConvNd):
        k = "x".join(str(x) for x in m.kernel_size)
        pad = m.padding if isinstance(m.padding, str) else _compact(m.padding)
        s = f"{name} {m.out_channels}@{k} s{_compact(m.stride)} p{pad}"
        if m.groups > 1:
            s += f" g{m.groups}"
        if any(d > 1 for d in m.dilation):
            s += f" d{_compact(m.dilation)}"
        return s
    if isinstance(m, nn.Linear):
        return f"{name} {m.in_features}->{m.out_features}"
    if isinstance(m, (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd)):
        nd = 1 if name.endswith("1d") else 3 if name.endswith("3d") else 2
        k = _tuple(m.kernel_size, nd)
        s = f"{name} {'x'.join(map(str, k))} s{_compact(_tuple(m.stride or m.kernel_size, nd))}"
        pad = _tuple(m.padding, nd)
        return s + (f" p{_compact(pad)}" if any(pad) else "")
    if isinstance(m, (nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)):
        return f"{name} ->{_compact(_tuple(m.output_size, 1))}"
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return f"{name} {m.num_features}"
    if isinstance(m, nn.LayerNorm):
        return f"{name} {_compact(tuple(m.normalized_shape))}"
    if isinstance(m, nn.GroupNorm):
        return f"{name} {m.num_groups}g {m.num_channels}"
    if isinstance(m, nn.modules.dropout._DropoutNd):
        return f"{name} p={m.p}"
    if isinstance(m, (nn.Softmax, nn.LogSoftmax)):
        return f"{name} dim={m.dim}"
    return name


def _adaptive_window_total(in_sizes: Sequence[int], out_sizes: Sequence[int]) -> int:
    """Number of input elements summed over all adaptive-pooling windows of one channel."""
    total = 1
    for n_in, n_out in zip(in_sizes, out_sizes):
        total *= sum(math.ceil((i + 1) * n_in / n_out) - (i * n_in) // n_out for i in range(n_out))
    return total


def _ops(m: nn.Module, xs: list[torch.Tensor], y: torch.Tensor) -> tuple[dict[str, int], int, bool]:
    """(operation counts, MACs, counted?) for one call of module m on batch-1 tensors."""
    x = xs[0] if xs else y
    n_out, n_in = y.numel(), x.numel()
    if hasattr(m, "anatomy_ops"):
        ops = {k: int(v) for k, v in m.anatomy_ops(xs, y).items()}
        return ops, ops.pop("macs", 0), True
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        mults = n_in * (m.out_channels // m.groups) * math.prod(m.kernel_size)
        adds = mults - n_out + (n_out if m.bias is not None else 0)
        return {"mults": mults, "adds": adds}, mults, True
    if isinstance(m, nn.modules.conv._ConvNd):
        k = (m.in_channels // m.groups) * math.prod(m.kernel_size)
        return {"mults": n_out * k, "adds": n_out * (k - 1) + (n_out if m.bias is not None else 0)}, n_out * k, True
    if isinstance(m, nn.Linear):
        k = m.in_features
        return {"mults": n_out * k, "adds": n_out * (k - 1) + (n_out if m.bias is not None else 0)}, n_out * k, True
    if isinstance(m, nn.modules.pooling._MaxPoolNd):
        nd = y.dim() - 2 if y.dim() > 2 else 1
        k = math.prod(_tuple(m.kernel_size, nd))
        return {"max": n_out * (k - 1)}, 0, True
    if isinstance(m, nn.modules.pooling._AvgPoolNd):
        nd = y.dim() - 2 if y.dim() > 2 else 1
        k = math.prod(_tuple(m.kernel_size, nd))
        return {"adds": n_out * (k - 1), "mults": n_out}, 0, True
    if isinstance(m, (nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)):
        nd = len(_tuple(m.output_size, 1)) if isinstance(m.output_size, (tuple, list)) else \
            (1 if type(m).__name__.endswith("1d") else 3 if type(m).__name__.endswith("3d") else 2)
        out_sp, in_sp = tuple(y.shape[-nd:]), tuple(x.shape[-nd:])
        planes = n_out // math.prod(out_sp)
        window = planes * _adaptive_window_total(in_sp, out_sp)  # input elements read, over all windows
        if isinstance(m, nn.modules.pooling._AdaptiveMaxPoolNd):
            return {"max": window - n_out}, 0, True
        return {"adds": window - n_out, "mults": n_out}, 0, True
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return {"mults": n_out, "adds": n_out}, 0, True
    if isinstance(m, _NORMS):
        if isinstance(m, nn.LayerNorm):
            n = math.prod(m.normalized_shape)
        elif isinstance(m, nn.GroupNorm):
            n = n_out // m.num_groups
        else:  # InstanceNorm: per channel
            n = math.prod(y.shape[2:])
        groups = n_out // n
        affine = getattr(m, "elementwise_affine", getattr(m, "affine", False))
        adds = groups * ((n - 1) + n + (n - 1) + 1 + (n if affine else 0))
        mults = groups * (1 + n + 1 + n + (n if affine else 0))
        return {"adds": adds, "mults": mults, "other": groups}, 0, True
    if isinstance(m, nn.ReLU):
        return {"max": n_out}, 0, True
    if isinstance(m, (nn.ReLU6, nn.Hardtanh)):
        return {"max": 2 * n_out}, 0, True
    if isinstance(m, (nn.LeakyReLU, nn.PReLU)):
        return {"mults": n_out, "max": n_out}, 0, True
    if isinstance(m, nn.Hardsigmoid):
        return {"adds": n_out, "max": 2 * n_out, "mults": n_out}, 0, True
    if isinstance(m, nn.Hardswish):
        return {"adds": n_out, "max": 2 * n_out, "mults": 2 * n_out}, 0, True
    if isinstance(m, nn.SiLU):
        return {"other": n_out, "mults": n_out}, 0, True
    if isinstance(m, (nn.Sigmoid, nn.Tanh, nn.GELU, nn.ELU, nn.SELU, nn.CELU, nn.Softplus, nn.Mish)):
        return {"other": n_out}, 0, True
    if isinstance(m, (nn.Softmax, nn.LogSoftmax)):
        dim = m.dim if m.dim is not None else -1
        n = y.shape[dim]
        rows = n_out // n
        if isinstance(m, nn.Softmax):
            return {"other": 2 * n_out, "adds": rows * (n - 1)}, 0, True
        return {"other": n_out + rows, "adds": rows * (n - 1) + n_out}, 0, True
    if isinstance(m, (nn.modules.dropout._DropoutNd, nn.Flatten, nn.Unflatten)):
        return {}, 0, True
    return {}, 0, False


# --------------------------------------------------------------------------------------------------------
# describe


def _row_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Identity) or (isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict))
                                          and not hasattr(m, "anatomy_ops")):
            continue  # pass-through and containers (even empty ones) do no work of their own
        leaf = next(m.children(), None) is None
        if leaf or isinstance(m, _COUNTED) or hasattr(m, "anatomy_ops"):
            out.append((name or type(m).__name__, m))
    return out


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


def _per_sample(t: torch.Tensor) -> list[int]:
    return list(t.shape[1:]) if t.dim() > 0 else []


def describe(model: nn.Module, input_shape: Sequence[int], title: str | None = None) -> Anatomy:
    """Run one sample of `input_shape` (without the batch dimension, e.g. (3, 32, 32)) through `model` in
    eval mode and return its anatomy. The model's training mode is restored afterwards."""
    input_shape = tuple(int(d) for d in input_shape)
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    x = torch.randn((1, *input_shape), generator=torch.Generator().manual_seed(0)).to(device, dtype)

    rows: list[Row | None] = []
    stacks: dict[int, list[int]] = {}

    def pre_hook(m, inputs):
        stacks.setdefault(id(m), []).append(len(rows))
        rows.append(None)  # reserve the index: rows are numbered by call start (parents before children)

    def make_hook(name: str):
        def hook(m, inputs, output):
            i = stacks[id(m)].pop()
            xs, ys = _tensors(inputs), _tensors(output)
            y = ys[0] if ys else (xs[0] if xs else torch.zeros(1, 0))
            ops, macs, counted = _ops(m, xs, y)
            w, b = getattr(m, "weight", None), getattr(m, "bias", None)
            rows[i] = Row(
                n=i + 1, name=name, fn=_fn(m), input_shape=[_per_sample(t) for t in xs],
                output_shape=_per_sample(y),
                weight_shape=list(w.shape) if isinstance(w, torch.Tensor) else None,
                bias_shape=list(b.shape) if isinstance(b, torch.Tensor) else None,
                params=sum(p.numel() for p in m.parameters(recurse=False)),
                macs=int(macs), counted=counted, **{k: int(ops.get(k, 0)) for k in OPS},
            )
        return hook

    handles = []
    row_modules = _row_modules(model)
    for name, m in row_modules:
        handles.append(m.register_forward_pre_hook(pre_hook))
        handles.append(m.register_forward_hook(make_hook(name)))
    was_training = model.training
    reference = None
    model.eval()
    try:
        from torch.utils.flop_counter import FlopCounterMode

        with torch.no_grad():
            try:
                counter = FlopCounterMode(display=False)
                with counter:
                    model(x)
                reference = counter.get_total_flops() // 2
            except Exception:  # noqa: BLE001 - the reference is optional; count with hooks alone
                rows.clear()
                stacks.clear()
                model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    done = [r for r in rows if r is not None]
    for i, r in enumerate(done):
        r.n = i + 1
    totals = {"params": sum(p.numel() for p in model.parameters()),
              **{k: sum(getattr(r, k) for r in done) for k in OPS}, "macs": sum(r.macs for r in done)}
    totals["ops"] = sum(totals[k] for k in OPS)

    notes = []
    uncounted = sorted({r.fn for r in done if not r.counted})
    if uncounted:
        notes.append(f"not counted (no convention): {', '.join(uncounted)}")
    seen = {id(m) for _, m in row_modules}
    unseen = sum(p.numel() for m in model.modules() if id(m) not in seen for p in m.parameters(recurse=False))
    if unseen:
        notes.append(f"{unseen:,} parameters belong to modules without a row (used functionally)")
    if reference is not None and reference != totals["macs"]:
        notes.append(f"FlopCounterMode counts {reference - totals['macs']:+,} MACs beyond the conv/linear rows "
                     "(matmuls inside custom or functional code)")
    return Anatomy(title or type(model).__name__, input_shape, done, totals, reference, notes)


def operations_per_sample(model: nn.Module, input_shape: Sequence[int]) -> dict[str, int]:
    """Totals per sample: params, adds, mults, max, other, ops (their sum) and macs (conv + linear +
    matmul-like custom modules)."""
    return describe(model, input_shape).totals


# --------------------------------------------------------------------------------------------------------
# CLI


def parse_input_shape(text: str, channels: int = 3) -> tuple[int, ...]:
    """"3x32x32" or "3,32,32" -> (3, 32, 32); a single side "32" -> (channels, 32, 32)."""
    parts = [p for p in text.lower().replace(",", "x").replace("×", "x").split("x") if p.strip()]
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        raise ClassforgeError(f"--input expects sizes like 3x32x32, got {text!r}") from None
    if not dims or any(d < 1 for d in dims):
        raise ClassforgeError(f"--input expects positive sizes like 3x32x32, got {text!r}")
    return (channels, dims[0], dims[0]) if len(dims) == 1 else dims


def _parse_args(pairs: Sequence[str]) -> dict[str, Any]:
    out = {}
    for p in pairs:
        if "=" not in p:
            raise ClassforgeError(f"--arg expects KEY=VALUE, got {p!r}")
        k, v = p.split("=", 1)
        out[k.strip().replace("-", "_")] = load_yaml(v)
    return out


def _run_dir_model(path: Path) -> tuple[str, dict, int | None]:
    """(backbone name, backbone kwargs, classes) of a run directory: model.json when the run wrote one
    (the exact kwargs the model was built with), else config.yaml (`backbone`, `extra.backbone_kwargs`) and
    labels.json (a JSON list of class names)."""
    meta_file, cfg_file, labels_file = path / "model.json", path / "config.yaml", path / "labels.json"
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        if meta.get("backbone"):
            return meta["backbone"], dict(meta.get("backbone_kwargs") or {}), meta.get("num_classes")
    if not cfg_file.is_file():
        raise ClassforgeError(f"{path} is a folder without config.yaml: not a run directory")
    cfg = load_yaml(cfg_file.read_text()) or {}
    if not cfg.get("backbone"):
        raise ClassforgeError(f"{cfg_file} has no `backbone` key")
    kwargs = cfg.get("backbone_kwargs") or (cfg.get("extra") or {}).get("backbone_kwargs") or {}
    classes = len(json.loads(labels_file.read_text())) if labels_file.is_file() else None
    return cfg["backbone"], dict(kwargs), classes


def build_for_describe(target: str, num_classes: int | None = None, kwargs: dict | None = None):
    """(Classifier, title, default per-sample input shape) for a backbone name or a run directory."""
    kwargs = dict(kwargs or {})
    path = Path(target)
    if path.is_dir():
        name, run_kwargs, run_classes = _run_dir_model(path)
        kwargs = {**run_kwargs, **kwargs}  # exactly what the run was built with, unless overridden
        num_classes = run_classes if num_classes is None else num_classes
        state_file: Path | None = path / "model.safetensors"
        title = f"{path.name} ({name})"
    else:
        name, title, state_file = target, target, None
        if ("fit_budget" in kwargs or "max_params" in kwargs) and "num_classes" not in kwargs:
            kwargs["num_classes"] = 10 if num_classes is None else int(num_classes)  # the budget counts the head
    num_classes = 10 if num_classes is None else int(num_classes)
    backbone = create_backbone(name, pretrained=False, **kwargs)
    model = Classifier(backbone, num_classes)
    if state_file is not None and state_file.is_file():
        # Rebuilding from the run's files must give the trained architecture; the weights prove it.
        from safetensors.torch import load_file

        try:
            model.load_state_dict(load_file(str(state_file)), strict=True)
        except RuntimeError as e:
            raise ClassforgeError(f"{state_file} does not match the model rebuilt from the run's files "
                                  f"({name}, {num_classes} classes): {str(e).splitlines()[0]}") from None
    spec = backbone.spec
    if spec.task == "audio":
        default = (round(spec.sample_rate * spec.clip_seconds),)
    else:
        default = (spec.channels, spec.size, spec.size)
    return model, f"{title}, {num_classes} classes", default
