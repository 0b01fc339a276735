"""ONNX as an engine: convert a model with a free batch axis, open an ONNX Runtime session, run it, and compare
its logits with eager fp32 PyTorch."""

from __future__ import annotations

import io
import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from classforge.core.errors import ClassforgeError
from classforge.runtime.ort import ort_session

__all__ = ["OPSET", "TOLERANCE", "add_metadata", "as_columns", "ort_session", "parity", "run_ort", "run_torch",
           "torch_to_onnx", "torch_to_onnx_bytes"]

OPSET = 17
TOLERANCE = 1e-4  # max |logit difference| between ONNX Runtime and eager fp32 PyTorch


def torch_to_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path, opset: int = OPSET) -> str:
    """Export with a free batch axis; returns the exporter used. The TorchScript exporter writes opset 17 as
    asked (the dynamo one starts at 18 and cannot convert Pad down); dynamo is the fallback. The outputs are
    named by the model's `output_names` (default: logits)."""
    tmp = path.with_name(path.name + ".tmp")
    exporter = _export(model, example, str(tmp), opset)
    os.replace(tmp, path)
    return exporter


def torch_to_onnx_bytes(model: torch.nn.Module, example: torch.Tensor, opset: int = OPSET) -> bytes:
    """torch_to_onnx into memory: a session can start before the file is written."""
    buffer = io.BytesIO()
    try:
        _export(model, example, buffer, opset, fallback=False)
        return buffer.getvalue()
    except ClassforgeError:
        with tempfile.TemporaryDirectory() as tmp:  # the dynamo exporter writes files only
            path = Path(tmp) / "model.onnx"
            torch_to_onnx(model, example, path, opset)
            return path.read_bytes()


def _export(model: torch.nn.Module, example: torch.Tensor, f, opset: int, fallback: bool = True) -> str:
    names = list(getattr(model, "output_names", ("logits",)))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), f, input_names=["input"], output_names=names,
                              opset_version=opset, dynamo=False,
                              dynamic_axes={"input": {0: "batch"}, **{n: {0: "batch"} for n in names}})
        return "torchscript"
    except Exception as first:  # noqa: BLE001 - any exporter failure: try the other one
        if not fallback:
            raise ClassforgeError(f"ONNX export failed: {first}") from first
        try:
            batch = torch.export.Dim("batch", min=1, max=4096)
            torch.onnx.export(model, (example,), f, input_names=["input"], output_names=names,
                              opset_version=max(opset, 18), dynamo=True, external_data=False,
                              dynamic_shapes=({0: batch},))
            return "dynamo"
        except Exception as second:
            raise ClassforgeError(f"ONNX export failed: {first} (dynamo exporter: {second})") from second


def add_metadata(path: Path, meta: dict, labels: list[str]) -> None:
    """Labels, preprocessing and the unknown threshold inside the .onnx too, so the file alone says how to feed
    it and read it. Keys already there are replaced."""
    import onnx

    props = {"classforge.labels": json.dumps(labels), "classforge.spec": json.dumps(meta["spec"]),
             "classforge.backbone": meta["backbone"], "classforge.task": meta["task"]}
    if meta.get("open_set"):
        props["classforge.open_set"] = json.dumps(meta["open_set"])
    m = onnx.load(str(path))
    kept = [p for p in m.metadata_props if p.key not in props]
    del m.metadata_props[:]
    for p in kept:
        m.metadata_props.add(key=p.key, value=p.value)
    for k, v in props.items():
        m.metadata_props.add(key=k, value=v)
    m.producer_name = "classforge"
    onnx.save(m, str(path))


def as_columns(outputs) -> np.ndarray:
    """A model's outputs as one float32 (B, C [+ 1]) array: a model with an unknown score gives (logits, score)."""
    if isinstance(outputs, torch.Tensor):
        return outputs.float().numpy()
    if len(outputs) == 1:
        return np.asarray(outputs[0], np.float32)
    return np.concatenate([np.asarray(o, np.float32).reshape(len(o), -1) for o in outputs], 1)


def run_ort(session, x: torch.Tensor, batch: int = 8) -> np.ndarray:
    name = session.get_inputs()[0].name
    return np.concatenate([as_columns(session.run(None, {name: x[i:i + batch].numpy()}))
                           for i in range(0, len(x), batch)])


@torch.inference_mode()
def run_torch(model: torch.nn.Module, x: torch.Tensor, batch: int = 8) -> np.ndarray:
    """Plain eager fp32 (no channels_last, no bf16 autocast): the reference."""
    return np.concatenate([as_columns(model(x[i:i + batch])) for i in range(0, len(x), batch)])


def parity(ref: np.ndarray, out: np.ndarray, tolerance: float = TOLERANCE, classes: int | None = None) -> dict:
    """max |Δlogit| must be <= tolerance while logits stay within ±10. float32 keeps ~7 significant digits, so
    a head that produces logits of 1e4 cannot agree to 1e-4 in any two runtimes (nor PyTorch with itself under a
    different summation order): there the bound grows with the logit scale, and the report says so. Columns past
    `classes` (the unknown score) are compared too, but are not classes for the top-1 agreement."""
    d = np.abs(out - ref)
    peak = float(np.abs(ref).max())
    scale = max(1.0, peak / 10.0)
    c = classes or ref.shape[1]
    res = {"max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean()), "max_abs_logit": peak,
           "top1_agreement": float((out[:, :c].argmax(1) == ref[:, :c].argmax(1)).mean()), "tolerance": tolerance,
           "scale": scale, "passed": bool(d.max() <= tolerance * scale),
           "within_absolute_tolerance": bool(d.max() <= tolerance)}
    if scale > 1:
        res["note"] = (f"logits reach {peak:.3g}: unusually large (a head with very large weights, e.g. features "
                       f"that were constant in training); float32 rounding alone then exceeds {tolerance:g}, so "
                       f"the bound was scaled to {tolerance * scale:.2g}")
    return res
