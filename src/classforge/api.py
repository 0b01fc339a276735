"""The public Python API (also `classforge.train`, `classforge.load`, ...). Each function loads the layers it
needs when called: `import classforge` and the command line's `--help` stay fast, and a linear run never pays
for Lightning."""

from __future__ import annotations

from pathlib import Path

from classforge.core.heap import loading_libraries


def train(data: str, out: str | None = None, **options) -> Path:
    """Train on DATA; options are TrainConfig keys (backbone, strategy, epochs, ...). Returns the run directory."""
    from classforge.core.config import TrainConfig

    return train_config(TrainConfig().replace(data=str(data), out=str(out or ""), **options))


def train_config(cfg) -> Path:
    """Train, evaluate and write the run that a TrainConfig describes. The files are checked in a second process
    while the training code loads, and where it can, that process also computes their features."""
    from classforge.runtime.ahead import start

    precheck = start(cfg) if cfg.data and not cfg.resume else None
    try:
        with loading_libraries():
            from classforge.training.run import train as run_train

        return run_train(cfg, precheck=precheck)
    finally:
        if precheck is not None:
            precheck.close()


def audit(data: str, out: str | Path, folds: int = 5, accept_top: int = 0, **options) -> dict:
    """Audit the labels of DATA into OUT (audit.csv, audit.html, corrected_labels.csv, audit.json); options are
    TrainConfig keys for the data and the backbone (labels_csv, classes, backbone, ...). Returns the summary."""
    from classforge.core.config import TrainConfig
    from classforge.runtime.threads import adapted_threads

    with loading_libraries():
        from classforge.training.audit import run_audit

    cfg = TrainConfig().replace(data=str(data), **options)
    with adapted_threads(cfg.threads):
        return run_audit(cfg, Path(out), folds=folds, accept_top=accept_top)


def update(run_dir: str | Path, data: str | None, out: str | Path, **options) -> Path:
    """A new run from a linear or two-stage run and DATA as it is now (new files, new class folders): the head is
    refit on cached embeddings, the old files keep their split. Returns the new run directory."""
    with loading_libraries():
        from classforge.training.update import update_run

    return update_run(run_dir, data, out, **options)


def suggest(run_dir: str | Path, unlabelled: str | Path, n: int = 50, out: str | Path | None = None) -> dict:
    """Which n files of an unlabelled folder to label next for a run: OUT (default RUN/suggestions) gets
    suggestions.csv, suggestions.html and suggestions.json. Returns the summary."""
    from classforge.runtime.threads import adapted_threads

    with loading_libraries():
        from classforge.training.suggest import suggest_files

    with adapted_threads():
        return suggest_files(run_dir, unlabelled, n, out)


def load(run_dir: str | Path, backend: str = "auto", unknown: bool = True, device: str = "cpu"):
    """A Predictor for a run directory: `.predict(paths, top_k=3)`, `.predict_proba(paths)`, `.labels`. Inputs
    unlike every class get label "unknown" (the closest class in `best_label`) unless unknown=False. `device`
    "cuda" runs the PyTorch model on the GPU."""
    with loading_libraries():  # the libraries the run's backend needs load as the predictor is built
        from classforge.runtime.predictor import Predictor

        return Predictor.from_run(run_dir, backend=backend, unknown=unknown, device=device)


def predict(run_dir: str | Path, inputs, top_k: int = 3, unknown: bool = True):
    """One input -> one result; a list -> a list. Inputs as for Predictor.predict: paths, bytes, PIL or numpy
    images, torch image tensors, (waveform, sample_rate) pairs."""
    return load(run_dir, unknown=unknown).predict(inputs, top_k=top_k)


def predict_files(run_dir: str | Path, files: list[str], top_k: int = 3, backend: str = "auto",
                  unknown: bool = True, device: str = "cpu") -> list[dict]:
    """Per-file results; a bad file gets an error entry instead of stopping the others."""
    from classforge.runtime.threads import adapted_threads

    with adapted_threads():
        return _predict_each(load(run_dir, backend, unknown, device), files, top_k)


def _predict_each(p, files: list[str], top_k: int) -> list[dict]:
    from classforge.core.errors import BadFile

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
    """Re-score a run on a labelled folder (or its own test split); writes metrics, predictions and a report."""
    from classforge.runtime.threads import adapted_threads

    with loading_libraries():
        from classforge.evaluation.evaluate import evaluate as ev

    with adapted_threads():
        return ev(run_dir, data, out)


def export(run_dir: str | Path, format: str = "onnx", quantize: str | None = None, **options) -> dict:
    """RUN/model.onnx, parity-checked against PyTorch (and model.int8.onnx with quantize="int8")."""
    with loading_libraries():
        from classforge.deploy.onnx import export_run

    return export_run(run_dir, format=format, quantize=quantize, **options)


def calibrate(run_dir: str | Path, data: str | None = None, test: bool = False,
              temperature: float | None = None) -> dict:
    """Temperature scaling fitted on the run's validation split, written into the run (predict, serve and the
    exported model use it); the model card, if there is one, is rewritten to state it."""
    with loading_libraries():
        from classforge.deploy.modelcard import write_model_card
        from classforge.evaluation.calibrate import calibrate_run

    res = calibrate_run(run_dir, data=data, test=test, temperature=temperature)
    if (Path(run_dir) / "README.md").is_file():
        write_model_card(run_dir)
    return res


def inspect_data(data: str, **options) -> dict:
    """What DATA holds (classes, counts, sizes, bad files, duplicates) and the split a run would make."""
    from classforge.data.inspect import inspect_data as inspect_folder

    return inspect_folder(data, **options)


def backbones() -> dict:
    """The registered backbones by name (each declares its task, input, weights and recipes)."""
    from classforge.models.registry import registered

    return registered()


def demo(out: str = "runs/demo", backbone: str = "efficientnet_lite0") -> Path:
    """Train on scikit-learn's digits (no download) and return the run directory."""
    from classforge.demo import demo_config

    return train_config(demo_config(out, backbone))


def describe(target: str, input_shape: str | None = None, num_classes: int | None = None,
             args: list[str] | None = None):
    """The layer-by-layer anatomy (shapes, parameters, operations per sample) of a backbone name or run folder."""
    from classforge.core.errors import ClassforgeError
    from classforge.models.anatomy import _parse_args, _shape, build_for_describe, parse_input_shape
    from classforge.models.anatomy import describe as anatomy_of

    model, title, default = build_for_describe(target, num_classes, _parse_args(args or []))
    shape = parse_input_shape(input_shape, default[0] if len(default) == 3 else 1) if input_shape else default
    try:
        return anatomy_of(model, shape, title=title)
    except RuntimeError as e:
        raise ClassforgeError(f"{target} cannot run on input {_shape(shape)}: {str(e).splitlines()[0]}") from None


def compare(data: str, backbones: list[str], strategies: list[str], preprocess_options: list[str] | None = None,
            base=None, out: str | Path | None = None, literal: bool = False, latency: bool = True) -> Path:
    """Train every backbone x strategy (x preprocessing) on one split and write the leaderboard; returns OUT."""
    with loading_libraries():
        from classforge.training.compare import compare as run_compare

    return run_compare(data, backbones, strategies, preprocess_options, base, out, literal, latency)


def compare_runs(run_dirs: list[str | Path], out: str | Path | None = None, latency: bool = True) -> Path:
    """A leaderboard of finished runs (same split checked); returns OUT."""
    with loading_libraries():
        from classforge.training.compare import compare_runs as leaderboard

    return leaderboard(run_dirs, out, latency=latency)


def search(data: str, **options) -> Path:
    """Hyperparameter search (optuna); writes best.yaml and a report; options as training.search.search."""
    with loading_libraries():
        from classforge.training.search import search as run_search

    return run_search(data, **options)


def track(run_dir: str | Path, uri: str | None = None, experiment: str | None = None) -> str:
    """Log a finished run to MLflow; returns the MLflow run id."""
    from classforge.training.tracking import track_run

    return track_run(run_dir, "mlflow", uri, experiment)


def model_card(run_dir: str | Path, license: str | None = None) -> Path:
    """Write RUN/README.md (Hugging Face Hub layout) from the run's metrics and metadata."""
    from classforge.deploy.modelcard import write_model_card

    return write_model_card(run_dir, license=license)


def push(run_dir: str | Path, repo_id: str, **options) -> str:
    """Upload the run to a Hugging Face Hub model repository; returns its URL."""
    from classforge.deploy.modelcard import push as push_run

    return push_run(run_dir, repo_id, **options)


def serving_app(run_dir: str | Path, limits: dict | None = None, **options):
    """The FastAPI app (REST API and, with ui=True, the web UI) serving a run; `serve_app` runs it."""
    with loading_libraries():
        from classforge.serve.api import Limits, create_app

    return create_app(run_dir, limits=Limits(**(limits or {})), **options)


def serve_app(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run a `serving_app` under uvicorn until interrupted, with its limits on slow and idle connections."""
    from classforge.serve.http import serve

    limits = app.state.limits
    serve(app, host, port, limits.request_timeout_s, limits.max_connections, log_level)
