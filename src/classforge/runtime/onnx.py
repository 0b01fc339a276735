"""ONNX as an engine: convert a model with a free batch axis, open an ONNX Runtime session, run it, and compare
its logits with eager fp32 PyTorch."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from classforge.core.errors import ClassforgeError

OPSET = 17
TOLERANCE = 1e-4  # max |logit difference| between ONNX Runtime and eager fp32 PyTorch


def torch_to_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path, opset: int = OPSET) -> str:
    """Export with a free batch axis; returns the exporter used. The TorchScript exporter writes opset 17 as
    asked (the dynamo one starts at 18 and cannot convert Pad down); dynamo is the fallback."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), str(tmp), input_names=["input"], output_names=["logits"],
                              opset_version=opset, dynamo=False,
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        exporter = "torchscript"
    except Exception as first:  # noqa: BLE001 - any exporter failure: try the other one
        try:
            batch = torch.export.Dim("batch", min=1, max=4096)
            torch.onnx.export(model, (example,), str(tmp), input_names=["input"], output_names=["logits"],
                              opset_version=max(opset, 18), dynamo=True, external_data=False,
                              dynamic_shapes=({0: batch},))
            exporter = "dynamo"
        except Exception as second:
            raise ClassforgeError(f"ONNX export failed: {first} (dynamo exporter: {second})") from second
    os.replace(tmp, path)
    return exporter


def add_metadata(path: Path, meta: dict, labels: list[str]) -> None:
    """Labels and preprocessing inside the .onnx too, so the file alone says how to feed it."""
    import onnx

    m = onnx.load(str(path))
    for k, v in {"classforge.labels": json.dumps(labels), "classforge.spec": json.dumps(meta["spec"]),
                 "classforge.backbone": meta["backbone"], "classforge.task": meta["task"]}.items():
        m.metadata_props.add(key=k, value=v)
    m.producer_name = "classforge"
    onnx.save(m, str(path))


def ort_session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as the Predictor's session
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_ort(session, x: torch.Tensor, batch: int = 8) -> np.ndarray:
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i:i + batch].numpy()})[0] for i in range(0, len(x), batch)])


@torch.inference_mode()
def run_torch(model: torch.nn.Module, x: torch.Tensor, batch: int = 8) -> np.ndarray:
    """Plain eager fp32 (no channels_last, no bf16 autocast): the reference."""
    return np.concatenate([model(x[i:i + batch]).float().numpy() for i in range(0, len(x), batch)])


def parity(ref: np.ndarray, out: np.ndarray, tolerance: float = TOLERANCE) -> dict:
    """max |Δlogit| must be <= tolerance while logits stay within ±10. float32 keeps ~7 significant digits, so
    a head that produces logits of 1e4 cannot agree to 1e-4 in any two runtimes (nor PyTorch with itself under a
    different summation order): there the bound grows with the logit scale, and the report says so."""
    d = np.abs(out - ref)
    peak = float(np.abs(ref).max())
    scale = max(1.0, peak / 10.0)
    res = {"max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean()), "max_abs_logit": peak,
           "top1_agreement": float((out.argmax(1) == ref.argmax(1)).mean()), "tolerance": tolerance,
           "scale": scale, "passed": bool(d.max() <= tolerance * scale),
           "within_absolute_tolerance": bool(d.max() <= tolerance)}
    if scale > 1:
        res["note"] = (f"logits reach {peak:.3g}: unusually large (a head with very large weights, e.g. features "
                       f"that were constant in training); float32 rounding alone then exceeds {tolerance:g}, so "
                       f"the bound was scaled to {tolerance * scale:.2g}")
    return res
