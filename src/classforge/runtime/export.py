"""ONNX Runtime as an engine: export a run's model with a free batch axis, and check ONNX Runtime against eager
fp32 PyTorch on the run's own files before anything uses it (evaluation, predict, serving, `classforge export`).

RUN/model.onnx takes what `Predictor.preprocess` yields (images: (B, 3, H, W) normalised; audio: (B, T)
waveform at the backbone's rate, the log-mel front end is inside the model) and returns (B, C) logits. The
preprocessing parameters (model.json "spec") and labels.json stay beside it, and are also copied into the ONNX
metadata so the file is usable alone. The figures go to RUN/export.json."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import torch

from classforge.core.errors import BadFile, ClassforgeError
from classforge.core.spec import InputSpec
from classforge.data.rundata import run_files
from classforge.models.open_set import WithUnknownScore, shipped
from classforge.runtime.onnx import (
    OPSET,
    TOLERANCE,
    add_metadata,
    ort_session,
    parity,
    run_ort,
    run_torch,
    torch_to_onnx,
)
from classforge.runtime.predictor import Predictor, load_run_model


def preprocess_files(predictor, files, n: int) -> tuple[list[torch.Tensor], dict[str, int]]:
    """Up to n preprocessed inputs from (path, label, split) rows, skipping unreadable files; counts per split."""
    xs, used = [], {}
    for path, _, split in files:
        if len(xs) >= n:
            break
        try:
            xs.append(predictor.preprocess(path))
        except BadFile:
            continue
        used[split] = used.get(split, 0) + 1
    return xs, used


def parity_inputs(run: Path, predictor, n: int, seed: int = 0) -> tuple[torch.Tensor, str]:
    """n preprocessed real inputs: the test split first, then val and train if the test split is smaller.
    Random tensors only when the run's files are not on this machine (and the source says so)."""
    xs, used = preprocess_files(predictor, run_files(run, ("test", "val", "train")), n)
    if xs:
        return torch.stack(xs), "real files: " + ", ".join(f"{k} split {v}" for k, v in used.items())
    g = torch.Generator().manual_seed(seed)
    spec = predictor.spec
    if spec.task == "audio":
        x = 0.1 * torch.randn(n, round(spec.sample_rate * spec.clip_seconds), generator=g)
    else:
        x = torch.randn(n, spec.channels, spec.size, spec.size, generator=g)
    return x, "random tensors (the run's data files are not available on this machine)"


# ---------------------------------------------------------------------------------------------- export


def export_checked(run_dir: str | Path, n_parity: int = 32, tolerance: float = TOLERANCE, opset: int = OPSET):
    """Write RUN/model.onnx and check it against eager fp32 PyTorch on n_parity real inputs. Returns
    (report, reference predictor, inputs, reference logits). A model that fails the check is moved to
    model.onnx.failed (never where the Predictor would pick it up) and a ClassforgeError says why."""
    run = Path(run_dir)
    model, meta, labels = load_run_model(run)  # plain fp32 eval model: the reference
    # The preprocessing is the Predictor's own (torch backend), so the tensors are exactly what serving feeds.
    pre = Predictor(model, InputSpec.from_dict(meta["spec"]), labels, fast=False)
    x, source = parity_inputs(run, pre, n_parity)
    net = shipped(model)
    if isinstance(net, WithUnknownScore):
        net.named_outputs()  # ONNX users read `logits` and `unknown_score` by name
    ref = run_torch(net, x)
    onnx_path = run / "model.onnx"
    (run / "export.json").unlink(missing_ok=True)
    exporter = torch_to_onnx(net, x[:2], onnx_path, opset)
    add_metadata(onnx_path, meta, labels)
    session = ort_session(onnx_path)
    res = parity(ref, run_ort(session, x), tolerance, classes=len(labels))
    res.update(n=len(x), source=source, batch_sizes=sorted({len(x[i:i + 8]) for i in range(0, len(x), 8)}))
    report = _report(onnx_path, session, opset, exporter, meta, labels, res)
    if not res["passed"]:
        failed = run / "model.onnx.failed"
        os.replace(onnx_path, failed)
        report["file"] = failed.name
        (run / "export.json").write_text(json.dumps(report, indent=2))
        raise ClassforgeError(f"ONNX parity check failed: max |Δlogit| {res['max_abs_diff']:.2e} > "
                              f"{tolerance * res['scale']:.2g} on "
                              f"{len(x)} inputs; the model was moved to {failed} and is not used")
    (run / "export.json").write_text(json.dumps(report, indent=2))
    return report, pre, x, ref


def _report(onnx_path: Path, session, opset: int, exporter: str, meta: dict, labels: list[str], res: dict) -> dict:
    import onnx
    import onnxruntime as ort

    return {
        "format": "onnx", "file": onnx_path.name, "bytes": onnx_path.stat().st_size, "opset": opset,
        "exporter": exporter, "created": dt.datetime.now().isoformat(timespec="seconds"),
        "input": {"name": session.get_inputs()[0].name, "shape": session.get_inputs()[0].shape, "dtype": "float32",
                  "what": "waveform at spec.sample_rate, clip_seconds long" if meta["task"] == "audio"
                  else "RGB image resized, centre-cropped and normalised by spec.mean/std"},
        "output": {"name": session.get_outputs()[0].name, "shape": session.get_outputs()[0].shape,
                   "what": "logits (softmax gives probabilities)"},
        **({"unknown_score": {"name": session.get_outputs()[1].name, "shape": session.get_outputs()[1].shape,
                              "what": "distance to the nearest class (models.open_set); above "
                                      "model.json open_set.threshold the answer is 'unknown'"}}
           if len(session.get_outputs()) > 1 else {}),
        "task": meta["task"], "backbone": meta["backbone"], "labels": labels, "spec": meta["spec"],
        "parity": res, "versions": {"torch": torch.__version__, "onnx": onnx.__version__,
                                    "onnxruntime": ort.__version__},
    }
