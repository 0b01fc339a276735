"""The one Predictor (preprocess -> forward -> postprocess) behind evaluation, `predict`, the API and the UI.

A run directory loads without training code and without pickle: model.json (architecture), labels.json,
model.safetensors (weights) and, after `classforge export`, model.onnx (used first when present)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import torch

from classforge.data.preprocess import make_preprocessor
from classforge.models.registry import ClassforgeError, Classifier, InputSpec, create_backbone


def build_model(meta: dict) -> Classifier:
    backbone = create_backbone(meta["backbone"], pretrained=False, **meta.get("backbone_kwargs", {}))
    return Classifier(backbone, meta["num_classes"], meta.get("dropout", 0.0))


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


class Predictor:
    """predict_proba(inputs) -> (N, C) probabilities; predict(inputs, top_k) -> list of dicts.
    Inputs are paths, bytes or PIL images / waveforms. Thread-safe: concurrent calls share one model."""

    def __init__(self, model: torch.nn.Module | None, spec: InputSpec, labels: list[str], onnx_path=None,
                 device: str = "cpu", max_pixels: int = 89_478_485, fast: bool = True):
        self.model, self.spec, self.labels, self.device = model, spec, list(labels), device
        self.pre = make_preprocessor(spec, augment="none", max_pixels=max_pixels)
        self.fast = fast
        self.session = None
        self.backend = "torch"
        self._lock = threading.Lock()
        if onnx_path is not None:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            self.session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
            self.input_name = self.session.get_inputs()[0].name
            self.backend = "onnxruntime"
        elif model is not None:
            from classforge.training.embeddings import prepare_fast

            self.model = prepare_fast(model, spec.task, device) if fast else model.eval().to(device)
        else:
            raise ValueError("Predictor needs a model or an ONNX file")

    @classmethod
    def from_run(cls, run_dir: str | Path, backend: str = "auto", device: str = "cpu", **kw) -> "Predictor":
        run = Path(run_dir)
        onnx_file = run / "model.onnx"
        use_onnx = backend == "onnx" or (backend == "auto" and onnx_file.is_file())
        if use_onnx and not onnx_file.is_file():
            raise ClassforgeError(f"{onnx_file} not found; run `classforge export {run}` first")
        if use_onnx:
            meta = json.loads((run / "model.json").read_text())
            labels = json.loads((run / "labels.json").read_text())
            p = cls(None, InputSpec.from_dict(meta["spec"]), labels, onnx_path=onnx_file, device=device, **kw)
        else:
            model, meta, labels = load_run_model(run)
            p = cls(model, InputSpec.from_dict(meta["spec"]), labels, device=device, **kw)
        p.meta = meta
        return p

    # -- preprocess -> forward -> postprocess
    def preprocess(self, src) -> torch.Tensor:
        return self.pre.eval(self.pre.load(src))

    def forward(self, x: torch.Tensor) -> np.ndarray:
        """(B, ...) preprocessed batch -> (B, C) logits as float32."""
        if self.session is not None:
            return self.session.run(None, {self.input_name: x.numpy().astype(np.float32)})[0]
        with self._lock:
            if self.fast:
                from classforge.training.embeddings import forward_batches

                return forward_batches(self.model, list(x), self.spec.task, self.device).numpy()
            with torch.inference_mode():
                return self.model(x.to(self.device)).float().cpu().numpy()

    def predict_proba(self, inputs, batch_size: int = 32, progress_desc: str | None = None) -> np.ndarray:
        from classforge.progress import progress

        out = []
        chunks = [inputs[i:i + batch_size] for i in range(0, len(inputs), batch_size)]
        bar = progress(range(len(inputs)), total=len(inputs), desc=progress_desc or "Predicting", unit="file")
        for chunk in chunks:
            x = torch.stack([self.preprocess(s) for s in chunk])
            out.append(softmax(self.forward(x)))
            bar.update(len(chunk))
        bar.close()
        return np.concatenate(out) if out else np.zeros((0, len(self.labels)), np.float32)

    def postprocess(self, probs: np.ndarray, top_k: int = 3) -> list[dict]:
        k = max(1, min(top_k, len(self.labels)))
        res = []
        for p in probs:
            order = np.argsort(-p)[:k]
            res.append({"label": self.labels[order[0]], "probability": float(p[order[0]]),
                        "top_k": [{"label": self.labels[i], "probability": float(p[i])} for i in order]})
        return res

    def predict(self, inputs, top_k: int = 3) -> list[dict]:
        return self.postprocess(self.predict_proba(list(inputs)), top_k)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
