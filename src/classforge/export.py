"""ONNX export of a run with a parity check on the run's own test files, optional int8 quantization.

RUN/model.onnx takes what `Predictor.preprocess` yields (images: (B, 3, H, W) normalised; audio: (B, T)
waveform at the backbone's rate, the log-mel front end is inside the model) and returns (B, C) logits; the batch
axis is free. The preprocessing parameters (model.json "spec") and labels.json stay beside it, and are also
copied into the ONNX metadata so the file is usable alone. The figures go to RUN/export.json."""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import sys
import time
import types
import warnings
from pathlib import Path

import numpy as np
import torch

from classforge.models.registry import ClassforgeError

OPSET = 17
TOLERANCE = 1e-4  # max |logit difference| between ONNX Runtime and eager fp32 PyTorch
QUANTIZE = ("int8", "int8-static", "int8-dynamic")


# ---------------------------------------------------------------------------------------------- run files
def data_root(run: Path) -> Path | None:
    """The folder split.csv paths are relative to: summary.json "data", else config.yaml `data`/labels_csv."""
    data, labels_csv = None, None
    if (run / "summary.json").is_file():
        data = json.loads((run / "summary.json").read_text()).get("data")
    if not data and (run / "config.yaml").is_file():
        from classforge.config import load_yaml

        cfg = load_yaml((run / "config.yaml").read_text()) or {}
        data, labels_csv = cfg.get("data"), cfg.get("labels_csv")
    if data:
        p = Path(data)
        if p.is_dir():
            return p
        if p.is_file():  # an archive: discovery extracted it into the cache once
            try:
                from classforge.data.discover import resolve_root

                return resolve_root(p)
            except Exception:  # noqa: BLE001 - a broken archive only means "no real files"
                return None
        return None
    return Path(labels_csv).resolve().parent if labels_csv else None


def run_files(run: str | Path, splits=("test",)) -> list[tuple[Path, str, str]]:
    """(absolute path, label, split) of the run's files in `splits` (in that order) that exist on this machine."""
    run = Path(run)
    root = data_root(run)
    if root is None or not (run / "split.csv").is_file():
        return []
    with open(run / "split.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for split in splits:
        for r in rows:
            if r.get("split") == split and (root / r["path"]).is_file():
                out.append((root / r["path"], r["label"], split))
    return out


def preprocess_files(predictor, files, n: int) -> tuple[list[torch.Tensor], dict[str, int]]:
    """Up to n preprocessed inputs from (path, label, split) rows, skipping unreadable files; counts per split."""
    from classforge.data.image import BadFile

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


# ---------------------------------------------------------------------------------------------- int8
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
    agree = float((out.argmax(1) == ref.argmax(1)).mean())
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


# ---------------------------------------------------------------------------------------------- main entry
def export_run(run_dir: str | Path, format: str = "onnx", quantize: str | None = None, n_parity: int = 32,
               tolerance: float = TOLERANCE, opset: int = OPSET, model_card: bool = True) -> dict:
    """Write RUN/model.onnx (+ model.int8.onnx with quantize="int8"), check parity, write export.json and the
    model card. A model that fails the parity check is not left where the Predictor would pick it up."""
    from classforge.serve.predictor import Predictor, load_run_model

    if format != "onnx":
        raise ClassforgeError(f"--format {format!r}: only onnx is supported")
    if quantize not in (None, "", "none", *QUANTIZE):
        raise ClassforgeError(f"--quantize {quantize!r}: use int8 (static when the training files are here, else "
                              "dynamic), int8-static or int8-dynamic")
    run = Path(run_dir)
    t0 = time.time()
    model, meta, labels = load_run_model(run)  # plain fp32 eval model: the reference
    # The preprocessing is the Predictor's own (torch backend), so the tensors are exactly what serving feeds.
    pre = Predictor(model, _spec(meta), labels, fast=False)
    x, source = parity_inputs(run, pre, n_parity)
    ref = run_torch(model, x)

    onnx_path = run / "model.onnx"
    (run / "export.json").unlink(missing_ok=True)
    exporter = torch_to_onnx(model, x[:2], onnx_path, opset)
    add_metadata(onnx_path, meta, labels)
    session = ort_session(onnx_path)
    out = run_ort(session, x)
    res = parity(ref, out, tolerance)
    res.update(n=len(x), source=source, batch_sizes=sorted({len(x[i:i + 8]) for i in range(0, len(x), 8)}))
    import onnx
    import onnxruntime as ort

    report = {
        "format": "onnx", "file": onnx_path.name, "bytes": onnx_path.stat().st_size, "opset": opset,
        "exporter": exporter, "created": dt.datetime.now().isoformat(timespec="seconds"),
        "input": {"name": session.get_inputs()[0].name, "shape": session.get_inputs()[0].shape, "dtype": "float32",
                  "what": "waveform at spec.sample_rate, clip_seconds long" if meta["task"] == "audio"
                  else "RGB image resized, centre-cropped and normalised by spec.mean/std"},
        "output": {"name": session.get_outputs()[0].name, "shape": session.get_outputs()[0].shape,
                   "what": "logits (softmax gives probabilities)"},
        "task": meta["task"], "backbone": meta["backbone"], "labels": labels, "spec": meta["spec"],
        "parity": res, "versions": {"torch": torch.__version__, "onnx": onnx.__version__,
                                    "onnxruntime": ort.__version__},
    }
    if not res["passed"]:
        failed = run / "model.onnx.failed"
        os.replace(onnx_path, failed)
        report["file"] = failed.name
        (run / "export.json").write_text(json.dumps(report, indent=2))
        raise ClassforgeError(f"ONNX parity check failed: max |Δlogit| {res['max_abs_diff']:.2e} > "
                              f"{tolerance * res['scale']:.2g} on "
                              f"{len(x)} inputs; the model was moved to {failed} and is not used")
    if quantize and quantize != "none":
        report["int8"] = quantize_int8(run, onnx_path, pre, x, ref, quantize)
    report["seconds"] = round(time.time() - t0, 2)
    (run / "export.json").write_text(json.dumps(report, indent=2))
    if model_card:
        from classforge.modelcard import write_model_card

        write_model_card(run)
    return report


def _spec(meta: dict):
    from classforge.models.registry import InputSpec

    return InputSpec.from_dict(meta["spec"])


# ---------------------------------------------------------------------------------------------- CLI
def add_commands(app) -> None:
    import typer

    @app.command("export")
    def export_cmd(
        run_dir: str = typer.Argument(..., help="A run directory (from `classforge train`)"),
        format: str = typer.Option("onnx", "--format", help="Export format (onnx)"),
        quantize: str = typer.Option(None, "--quantize", help="Also write model.int8.onnx: int8 (static, "
                                     "calibrated on the run's training files when present, else dynamic) | "
                                     "int8-static | int8-dynamic"),
        n_parity: int = typer.Option(32, "--parity-n", help="How many of the run's own files (test split first) "
                                     "to check ONNX Runtime against PyTorch on"),
        tolerance: float = typer.Option(TOLERANCE, "--tolerance", help="Max |Δlogit| allowed"),
        no_card: bool = typer.Option(False, "--no-card", help="Do not (re)write the model card RUN/README.md"),
    ):
        """Export a run to ONNX (RUN/model.onnx, opset 17, free batch axis) and check it against PyTorch.

        Parity: ONNX Runtime vs eager fp32 PyTorch logits on real files of the run's test split (random
        tensors only if the data is not on this machine); the figures go to RUN/export.json. `predict`,
        `evaluate` and `serve` use model.onnx through ONNX Runtime from then on. Also writes the model card."""
        from classforge.cli import _run, console

        r = _run(export_run, run_dir, format=format, quantize=quantize, n_parity=n_parity, tolerance=tolerance,
                 model_card=not no_card)
        p = r["parity"]
        console.print(f"[green]wrote[/] {Path(run_dir) / r['file']} ({r['bytes'] / 1e6:.1f} MB, opset {r['opset']}, "
                      f"{r['exporter']} exporter)")
        console.print(f"parity on {p['n']} inputs ({p['source']}): max |Δlogit| {p['max_abs_diff']:.2e} "
                      f"(≤ {p['tolerance'] * p['scale']:.2g}), top-1 agreement {p['top1_agreement']:.3f}")
        if p.get("note"):
            console.print(f"[yellow]note:[/] {p['note']}")
        if "int8" in r:
            q = r["int8"]
            console.print(f"[green]wrote[/] {Path(run_dir) / q['file']} ({q['bytes'] / 1e6:.1f} MB, {q['method']} "
                          f"int8): top-1 agreement with fp32 {q['top1_agreement']:.3f} on {q['n']} inputs")
        console.print(f"figures: {Path(run_dir) / 'export.json'}")
        if not no_card:
            console.print(f"model card: {Path(run_dir) / 'README.md'}")

    from classforge.modelcard import add_commands as card_commands

    card_commands(app)


# ---------------------------------------------------------------------------------------------- name clash
class _CallableModule(types.ModuleType):
    """Importing this module sets the package attribute `classforge.export` to the module, hiding the public
    function `classforge.export(run_dir, ...)`. Calling the module does what the function does, so both
    `classforge.export(run)` and `classforge.export.export_run(run)` keep working in any import order."""

    def __call__(self, run_dir: str | Path, format: str = "onnx", quantize: str | None = None, **kw) -> dict:
        return export_run(run_dir, format=format, quantize=quantize, **kw)


sys.modules[__name__].__class__ = _CallableModule
