"""The one Predictor (preprocess -> forward -> postprocess) behind evaluation, `predict`, the API and the UI.

A run directory loads without training code and without pickle: model.json (architecture), labels.json,
model.safetensors (weights) and, after `classforge export`, model.onnx (used first when present)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import torch

from classforge.core.errors import BadFile, ClassforgeError
from classforge.core.files import write_atomically
from classforge.core.progress import progress
from classforge.core.spec import InputSpec
from classforge.data.preprocess import make_preprocessor
from classforge.models.open_set import MahalanobisScore, shipped
from classforge.models.registry import Classifier, create_backbone
from classforge.runtime.batching import MicroBatcher
from classforge.runtime.decode import decoded_batches
from classforge.runtime.engines import forward_batches, prepare_fast
from classforge.runtime.onnx import as_columns
from classforge.runtime.threads import BusyWatch


def build_model(meta: dict) -> Classifier:
    backbone = create_backbone(meta["backbone"], pretrained=False, **meta.get("backbone_kwargs", {}))
    model = Classifier(backbone, meta["num_classes"], meta.get("dropout", 0.0))
    if meta.get("open_set"):
        model.open_set = MahalanobisScore(meta["num_classes"], backbone.feature_dim)
    return model


def load_run_model(run_dir: str | Path) -> tuple[Classifier, dict, list[str]]:
    from safetensors.torch import load_file

    run = Path(run_dir)
    for f in ("model.json", "labels.json", "model.safetensors"):
        if not (run / f).is_file():
            raise ClassforgeError(f"{run} is not a classforge run directory (missing {f})")
    meta = json.loads((run / "model.json").read_text())
    labels = json.loads((run / "labels.json").read_text())
    model = build_model(meta)
    sd = load_file(str(run / "model.safetensors"))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected or [k for k in missing if not k.endswith("num_batches_tracked")]:
        raise ClassforgeError(f"{run}/model.safetensors does not match model.json "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval(), meta, labels


def update_run_meta(run_dir: str | Path, **changes) -> dict:
    """Set top-level keys of RUN/model.json (atomically: a crash never leaves half a file); returns the new meta.
    `backbone_kwargs` given as a dict is merged into the existing one."""
    path = Path(run_dir) / "model.json"
    if not path.is_file():
        raise ClassforgeError(f"{run_dir} is not a classforge run directory (missing model.json)")
    meta = json.loads(path.read_text())
    for k, v in changes.items():
        meta[k] = {**(meta.get(k) or {}), **v} if k == "backbone_kwargs" else v
    write_atomically(path, json.dumps(meta, indent=2).encode())
    return meta


def check_device(device: str) -> str:
    """'cpu', or a CUDA device torch can see ('cuda', 'cuda:1'); a clear error otherwise."""
    device = (device or "cpu").strip().lower()
    if device == "cpu":
        return device
    if not device.startswith("cuda"):
        raise ClassforgeError(f"--device must be cpu, cuda or cuda:N, not {device!r}")
    if not torch.cuda.is_available():
        raise ClassforgeError(f"--device {device}: torch sees no CUDA device here; use --device cpu")
    index = device.partition(":")[2]
    if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
        raise ClassforgeError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


class Predictor:
    """predict_proba(inputs) -> (N, C) probabilities; predict(inputs, top_k) -> list of dicts.
    Inputs are paths, bytes or PIL images / waveforms. Thread-safe: concurrent calls share one model.
    The server calls start_batching(): forward_batched() then joins requests that arrive together into one
    forward pass (classforge.runtime.batching). max_audio_seconds refuses long recordings before decoding.

    forward() returns the model's outputs: (B, C) logits, and for a run with an open-set score one more column,
    the unknown score (see models.open_set). `open_set` (from model.json: the threshold) turns results whose
    score is above it into label "unknown"; `unknown=False` keeps the best class whatever the score."""

    def __init__(self, model: torch.nn.Module | None, spec: InputSpec, labels: list[str], onnx_path=None,
                 device: str = "cpu", max_pixels: int = 89_478_485, fast: bool = True,
                 max_audio_seconds: float | None = None, threads: int | None = None, unknown: bool = True):
        model = shipped(model) if model is not None else None
        self.model, self.spec, self.labels, self.device = model, spec, list(labels), device
        self.open_set: dict | None = None  # {"threshold": ..., ...} from model.json once the run has chosen it
        self.unknown = unknown
        self.pre = make_preprocessor(spec, augment="none", max_pixels=max_pixels)
        self.max_audio_seconds = max_audio_seconds
        self.fast = fast
        self.session = None
        self.backend = "torch"
        self.batcher = None
        self.temperature = 1.0  # logits are divided by it before the softmax (`classforge calibrate` fits it)
        self._lock = threading.Lock()
        self.session_single = None  # a one-thread session for per-core forward workers (start_batching)
        self.session_spinning = None  # all threads spin-waiting: a lone request on idle cores (start_batching)
        self.busy_watch = None
        if onnx_path is not None:
            # the caller's torch thread count (adapted to how busy the machine is) unless told otherwise
            self.threads = threads or torch.get_num_threads()
            self.session = ort_cpu_session(onnx_path, self.threads)
            self.input_name = self.session.get_inputs()[0].name
            self.backend = "onnxruntime"
            self.onnx_path = Path(onnx_path)
        elif model is not None:
            self.model = prepare_fast(model, spec.task, device) if fast else model.eval().to(device)
        else:
            raise ValueError("Predictor needs a model or an ONNX file")

    @classmethod
    def from_run(cls, run_dir: str | Path, backend: str = "auto", device: str = "cpu", **kw) -> "Predictor":
        """backend: auto (ONNX Runtime when model.onnx exists, else PyTorch) | onnx | int8 (model.int8.onnx
        from `classforge export --quantize int8`) | torch."""
        run = Path(run_dir)
        if backend not in ("auto", "onnx", "int8", "torch"):
            raise ClassforgeError(f"backend must be auto, onnx, int8 or torch, not {backend!r}")
        device = check_device(device)
        if device != "cpu" and backend in ("onnx", "int8"):
            raise ClassforgeError(f"the {backend} backend runs on the CPU; --device {device} needs --backend torch "
                                  "(or auto)")
        onnx_file = run / ("model.int8.onnx" if backend == "int8" else "model.onnx")
        # ONNX Runtime here is the CPU build: a GPU runs the PyTorch model
        use_onnx = backend in ("onnx", "int8") or (backend == "auto" and onnx_file.is_file() and device == "cpu")
        if use_onnx and not onnx_file.is_file():
            flag = " --quantize int8" if backend == "int8" else ""
            raise ClassforgeError(f"{onnx_file} not found; run `classforge export {run}{flag}` first")
        if use_onnx:
            meta = json.loads((run / "model.json").read_text())
            labels = json.loads((run / "labels.json").read_text())
            p = cls(None, InputSpec.from_dict(meta["spec"]), labels, onnx_path=onnx_file, device=device, **kw)
        else:
            model, meta, labels = load_run_model(run)
            p = cls(model, InputSpec.from_dict(meta["spec"]), labels, device=device, **kw)
        p.meta = meta
        p.temperature = float(meta.get("temperature", 1.0))
        if (meta.get("open_set") or {}).get("threshold") is not None:
            p.open_set = meta["open_set"]
        return p

    # -- preprocess -> forward -> postprocess
    def load(self, src):
        """Decode with the limits: image pixels (in the decoder), audio duration (header first, so a long
        recording is refused before it is decoded)."""
        if self.spec.task == "audio" and self.max_audio_seconds:
            check_audio_duration(src, self.max_audio_seconds)
            raw = self.pre.load(src)
            seconds = len(raw) / self.spec.sample_rate
            if seconds > self.max_audio_seconds * 1.05:  # MP3 headers only estimate their length
                raise BadFile(f"audio too long ({seconds:.1f} s > {self.max_audio_seconds:g} s limit)")
            return raw
        return self.pre.load(src)

    def preprocess(self, src) -> torch.Tensor:
        return self.pre.eval(self.load(src))

    def _preprocess_batch(self, items) -> torch.Tensor:
        return torch.stack([self.preprocess(s) for s in items])

    def forward(self, x: torch.Tensor) -> np.ndarray:
        """(B, ...) preprocessed batch -> (B, C) logits as float32 [+ the unknown score column]."""
        if self.session is not None:
            return as_columns(self.session.run(None, {self.input_name: x.numpy().astype(np.float32)}))
        return self._forward_torch(x)

    def _forward_single(self, x: torch.Tensor) -> np.ndarray:
        return as_columns(self.session_single.run(None, {self.input_name: x.numpy().astype(np.float32)}))

    def _forward_alone(self, x: torch.Tensor) -> np.ndarray:
        """Every thread on one request; spin-waiting threads only while other processes leave the cores idle
        (spinning fights a competing process for its core and then costs more than it saves)."""
        session = self.session_spinning if self.busy_watch.quiet else self.session
        return as_columns(session.run(None, {self.input_name: x.numpy().astype(np.float32)}))

    def _forward_torch(self, x: torch.Tensor) -> np.ndarray:
        with self._lock:
            if self.fast:
                # fp32: evaluation, `predict` and the server must give a file the same probabilities whatever
                # it is batched with; bf16 stays for embedding extraction, where speed matters most.
                return forward_batches(self.model, list(x), self.spec.task, self.device, bf16=False).numpy()
            with torch.inference_mode():
                return self.model(x.to(self.device)).float().cpu().numpy()

    # -- micro-batching of concurrent requests (the server turns it on)
    def start_batching(self, max_batch: int = 16, max_wait_ms: float = 5.0) -> Predictor:
        """Concurrent requests share forward passes. With ONNX Runtime on several threads, one single-threaded
        pass per thread runs at once while requests overlap (each core on its own pass: no intra-op barriers,
        which stall when another process holds a core), and a lone request still gets every thread: threads that
        spin-wait between the layers while no other process wants the cores, threads that sleep otherwise."""
        if self.batcher is None:
            if self.session is not None and self.threads > 1:
                self.session_single = ort_cpu_session(self.onnx_path, 1)
                self.session_spinning = ort_cpu_session(self.onnx_path, self.threads, spin=True)
                self.busy_watch = BusyWatch()
                self.batcher = MicroBatcher(self._forward_single, max_batch, max_wait_ms, workers=self.threads,
                                            forward_alone=self._forward_alone)
            else:
                self.batcher = MicroBatcher(self.forward, max_batch, max_wait_ms)
        return self

    def batch_slot(self):
        """Context around decode + forward_batched of one request: lets the batcher know it is coming."""
        import contextlib

        return self.batcher.expect() if self.batcher is not None else contextlib.nullcontext()

    def forward_batched(self, x: torch.Tensor) -> np.ndarray:
        """forward(x), shared with other threads' requests that arrive within the batching window."""
        return self.batcher.submit(x) if self.batcher is not None else self.forward(x)

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()
            self.batcher = None
        if self.busy_watch is not None:
            self.busy_watch.close()
            self.busy_watch = None

    def predict_outputs(self, inputs, batch_size: int = 32, progress_desc: str | None = None) -> np.ndarray:
        """(N, C [+ 1]) float32 outputs of N files (paths or bytes), `batch_size` at a time, with a progress bar."""
        out = []
        bar = progress(range(len(inputs)), total=len(inputs), desc=progress_desc or "Predicting", unit="file")
        for chunk, x in decoded_batches(inputs, self._preprocess_batch, batch_size):
            out.append(np.asarray(self.forward(x), np.float32))
            bar.update(len(chunk))
        bar.close()
        return np.concatenate(out) if out else np.zeros((0, len(self.labels)), np.float32)

    def predict_logits(self, inputs, batch_size: int = 32, progress_desc: str | None = None) -> np.ndarray:
        """(N, C) float32 logits of N files."""
        return self.split_outputs(self.predict_outputs(inputs, batch_size, progress_desc))[0]

    def predict_proba(self, inputs, batch_size: int = 32, progress_desc: str | None = None) -> np.ndarray:
        logits = self.predict_logits(inputs, batch_size, progress_desc)
        return self.probs(logits) if len(logits) else logits

    def split_outputs(self, outputs: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(B, C [+ 1]) outputs -> (B, C) logits and the (B,) unknown scores (None for a run without them)."""
        c = len(self.labels)
        return outputs[:, :c], (outputs[:, c] if outputs.shape[1] > c else None)

    def probs(self, logits) -> np.ndarray:
        """(B, C) logits -> probabilities, with the run's calibration temperature."""
        return softmax(np.asarray(logits, dtype=np.float32)[:, :len(self.labels)] / np.float32(self.temperature))

    def results(self, outputs: np.ndarray, top_k: int = 3, unknown: bool | None = None) -> list[dict]:
        """Forward outputs -> result dicts (postprocess with the unknown scores)."""
        logits, scores = self.split_outputs(np.asarray(outputs, np.float32))
        return self.postprocess(self.probs(logits), top_k, scores, unknown)

    def postprocess(self, probs: np.ndarray, top_k: int = 3, unknown_scores: np.ndarray | None = None,
                    unknown: bool | None = None) -> list[dict]:
        """Result dicts: label, probability, top_k. With the run's open-set threshold, every result also says
        `unknown_score`, and one above the threshold is labelled "unknown" (its best class and probability stay
        in `best_label` / `probability` and top_k) unless unknown=False (default: the Predictor's setting)."""
        k = max(1, min(top_k, len(self.labels)))
        threshold = (self.open_set or {}).get("threshold")
        flag = self.unknown if unknown is None else unknown
        res = []
        for i, p in enumerate(probs):
            order = np.argsort(-p)[:k]
            r = {"label": self.labels[order[0]], "probability": float(p[order[0]]),
                 "top_k": [{"label": self.labels[j], "probability": float(p[j])} for j in order]}
            if unknown_scores is not None and threshold is not None:
                r["unknown_score"] = round(float(unknown_scores[i]), 4)
                r["unknown"] = bool(flag and unknown_scores[i] > threshold)
                if r["unknown"]:
                    r = {"label": UNKNOWN, "best_label": r["label"], **{k2: v for k2, v in r.items() if k2 != "label"}}
            res.append(r)
        return res

    def predict(self, inputs, top_k: int = 3):
        """One input -> one result dict; a list (or any iterable) of inputs -> a list of results. An input is a
        path (str or Path), the file's bytes, a PIL image, a numpy image (H, W) / (H, W, C), uint8 or float, a
        torch image tensor (C, H, W), or for audio (waveform, sample_rate) with a numpy or torch waveform."""
        if is_one_input(inputs):
            return self.results(self.predict_outputs([inputs]), top_k)[0]
        return self.results(self.predict_outputs(list(inputs)), top_k)

    def predict_iter(self, inputs, top_k: int = 3, batch_size: int = 32):
        """Results one by one, in order, `batch_size` inputs at a time: for lists too large to hold at once."""
        chunk: list = []
        for item in inputs:
            chunk.append(item)
            if len(chunk) == batch_size:
                yield from self.results(self.predict_outputs(chunk, batch_size), top_k)
                chunk = []
        if chunk:
            yield from self.results(self.predict_outputs(chunk, batch_size), top_k)


UNKNOWN = "unknown"  # the label of an input the open-set score finds foreign to every class


def is_one_input(x) -> bool:
    """A single input rather than a collection of them (a string is one path, not its characters)."""
    from PIL import Image

    if isinstance(x, (str, Path, bytes, bytearray, memoryview, Image.Image)) or hasattr(x, "shape"):
        return True
    return isinstance(x, tuple) and len(x) == 2 and hasattr(x[0], "shape") and isinstance(x[1], (int, np.integer))


def ort_cpu_session(path, threads: int, spin: bool = False):
    """An ONNX Runtime CPU session on `threads` intra-op threads. Idle intra-op threads spin only when asked:
    on shared cores (other requests decoding, other jobs) spinning costs more than it saves."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def check_audio_duration(src, limit_s: float) -> None:
    """Refuse long audio from its header, before decoding; unreadable headers are left to the decoder."""
    import io

    import soundfile as sf

    try:
        fp = io.BytesIO(bytes(src)) if isinstance(src, (bytes, bytearray, memoryview)) else src
        info = sf.info(fp)
    except Exception:  # noqa: BLE001 - the decoder reports what is wrong with the file
        return
    if info.samplerate > 0 and info.frames / info.samplerate > limit_s * 1.05:
        raise BadFile(f"audio too long ({info.frames / info.samplerate:.1f} s > {limit_s:g} s limit)")


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
