"""The public Python API (also re-exported from `classforge`)."""

from __future__ import annotations

from pathlib import Path

from classforge.data.image import BadFile
from classforge.models.registry import ClassforgeError


def train(data: str, out: str | None = None, **options) -> Path:
    """Train on DATA; options are TrainConfig keys (backbone, strategy, epochs, ...). Returns the run directory."""
    from classforge.config import TrainConfig
    from classforge.training.run import train as run_train

    return run_train(TrainConfig().replace(data=str(data), out=str(out or ""), **options))


def load(run_dir: str | Path, backend: str = "auto"):
    """A Predictor for a run directory: `.predict(paths, top_k=3)`, `.predict_proba(paths)`, `.labels`."""
    from classforge.serve.predictor import Predictor

    return Predictor.from_run(run_dir, backend=backend)


def predict(run_dir: str | Path, paths, top_k: int = 3) -> list[dict]:
    return load(run_dir).predict(list(paths), top_k=top_k)


def predict_files(run_dir: str | Path, files: list[str], top_k: int = 3, backend: str = "auto") -> list[dict]:
    """Per-file results; a bad file gets an error entry instead of stopping the others."""
    p = load(run_dir, backend)
    out = []
    for f in files:
        if not Path(f).is_file():
            out.append({"file": f, "error": "file not found"})
            continue
        try:
            r = p.predict([f], top_k=top_k)[0]
        except BadFile as e:
            out.append({"file": f, "error": str(e)})
            continue
        out.append({"file": f, **r})
    return out


def evaluate(run_dir: str | Path, data: str | None = None, out: str | None = None) -> dict:
    from classforge.evaluation.evaluate import evaluate as ev

    return ev(run_dir, data, out)


def export(run_dir: str | Path, format: str = "onnx", quantize: str | None = None) -> dict:
    try:
        from classforge.export import export_run
    except ImportError as e:  # pragma: no cover
        raise ClassforgeError(f"export is not available: {e}") from e
    return export_run(run_dir, format=format, quantize=quantize)
