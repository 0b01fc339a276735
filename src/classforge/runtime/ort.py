"""ONNX Runtime sessions, without torch: a process that has not imported it runs models too (runtime.ahead)."""

from __future__ import annotations

from pathlib import Path


def ort_session(model: Path | bytes, threads: int | None = None):
    """An ONNX Runtime CPU session for a model file or a model's bytes."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as the Predictor's session
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), opts,
                                providers=["CPUExecutionProvider"])
