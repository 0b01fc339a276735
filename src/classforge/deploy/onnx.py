"""`classforge export`: the run's ONNX model (exported and parity-checked by the runtime's ONNX engine), an
optional int8 copy, and the model card."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from classforge.core.errors import ClassforgeError
from classforge.data.rundata import run_files
from classforge.deploy.modelcard import write_model_card
from classforge.runtime.export import export_checked, preprocess_files
from classforge.runtime.onnx import OPSET, TOLERANCE, ort_session, run_ort

QUANTIZE = ("int8", "int8-static", "int8-dynamic")


class _Calibration:
    """onnxruntime.quantization.CalibrationDataReader over preprocessed tensors, one at a time."""

    def __init__(self, name: str, x: torch.Tensor):
        self._it = iter([{name: x[i:i + 1].numpy()} for i in range(len(x))])

    def get_next(self):
        return next(self._it, None)


def calibration_inputs(run: Path, predictor, n: int = 64) -> tuple[torch.Tensor | None, int]:
    """Training files (never the test files the agreement is measured on)."""
    xs, _ = preprocess_files(predictor, run_files(run, ("train",)), n)
    return (torch.stack(xs), len(xs)) if xs else (None, 0)


def quantize_int8(run: Path, src: Path, predictor, x_eval: torch.Tensor, ref: np.ndarray, how: str) -> dict:
    """Static (QDQ, per-channel weights, calibrated on training files) when the run's files are here and
    `how` allows it, else dynamic (weights int8, activations quantized at run time). Writes model.int8.onnx."""
    from onnxruntime.quantization import QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    dst = run / "model.int8.onnx"
    tmp_pre = run / "model.int8.pre.onnx.tmp"
    t = time.time()
    x_cal, n_cal = (None, 0) if how == "int8-dynamic" else calibration_inputs(run, predictor)
    if how == "int8-static" and x_cal is None:
        raise ClassforgeError("--quantize int8-static needs the run's training files for calibration; they are not "
                              "on this machine (use int8-dynamic)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            quant_pre_process(str(src), str(tmp_pre), skip_symbolic_shape=True)
            base = tmp_pre
        except Exception:  # noqa: BLE001 - pre-processing only helps quantization; the raw graph also works
            base = src
        excluded = front_end_nodes(base)
        try:
            if x_cal is not None:
                method = "static"
                quantize_static(str(base), str(dst), _Calibration(predictor_input_name(src), x_cal),
                                per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                                nodes_to_exclude=excluded)
            else:
                method = "dynamic"
                quantize_dynamic(str(base), str(dst), weight_type=QuantType.QInt8, nodes_to_exclude=excluded)
        finally:
            tmp_pre.unlink(missing_ok=True)
    out = run_ort(ort_session(dst), x_eval)
    c = len(predictor.labels)  # past them: the unknown score column
    agree = float((out[:, :c].argmax(1) == ref[:, :c].argmax(1)).mean())
    return {"file": dst.name, "method": method, "calibration_files": n_cal, "float_nodes": len(excluded), "bytes": dst.stat().st_size,
            "top1_agreement": agree, "n": len(x_eval), "max_abs_diff": float(np.abs(out - ref).max()),
            "seconds": round(time.time() - t, 2)}


def front_end_nodes(path: Path) -> list[str]:
    """Nodes that feed a Log (an audio log-mel front end: DFT conv, power, mel matmul) and the Log itself.
    Their activations span many decades; uint8 activations there wreck the features, so they stay float."""
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    producer = {o: n for n in g.node for o in n.output}
    todo = [n for n in g.node if n.op_type == "Log"]
    seen: dict[str, None] = {}
    while todo:
        n = todo.pop()
        if n.name in seen:
            continue
        seen[n.name] = None
        todo += [producer[i] for i in n.input if i in producer]
    return list(seen)


def predictor_input_name(path: Path) -> str:
    return ort_session(path).get_inputs()[0].name



def export_run(run_dir: str | Path, format: str = "onnx", quantize: str | None = None, n_parity: int = 32,
               tolerance: float = TOLERANCE, opset: int = OPSET, model_card: bool = True) -> dict:
    """Write RUN/model.onnx (+ model.int8.onnx with quantize="int8"), check parity, write export.json and the
    model card. A model that fails the parity check is not left where the Predictor would pick it up."""
    if format != "onnx":
        raise ClassforgeError(f"--format {format!r}: only onnx is supported")
    if quantize not in (None, "", "none", *QUANTIZE):
        raise ClassforgeError(f"--quantize {quantize!r}: use int8 (static when the training files are here, else "
                              "dynamic), int8-static or int8-dynamic")
    run = Path(run_dir)
    t0 = time.time()
    report, pre, x, ref = export_checked(run, n_parity, tolerance, opset)
    if quantize and quantize != "none":
        report["int8"] = quantize_int8(run, run / "model.onnx", pre, x, ref, quantize)
    report["seconds"] = round(time.time() - t0, 2)
    (run / "export.json").write_text(json.dumps(report, indent=2))
    if model_card:
        write_model_card(run)
    return report
