"""Score a model through the same Predictor that `predict` and the server use, and write the report."""

from __future__ import annotations

import datetime as dt
import json
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from classforge.core.config import TrainConfig
from classforge.core.environment import environment
from classforge.core.errors import ClassforgeError
from classforge.core.files import open_csv
from classforge.data.discover import discover
from classforge.data.validate import validate
from classforge.evaluation import report as rp
from classforge.evaluation.changes import candidates_section, update_figures, update_section
from classforge.evaluation.figures import Figures
from classforge.evaluation.metrics import ordinal_metrics, run_warnings, summarize
from classforge.evaluation.open_set import choose_threshold, open_set_section, open_set_summary
from classforge.models.registry import count_params
from classforge.runtime.engines import resolve_eval_engine
from classforge.runtime.export import export_checked
from classforge.runtime.onnx import add_metadata, parity
from classforge.runtime.predictor import Predictor, update_run_meta
from classforge.runtime.threads import one_torch_thread


def _public(m: dict) -> dict:
    return {k: v for k, v in m.items() if k not in ("confusion", "per_class")}


def score(predictor: Predictor, samples, labels: list[str], desc: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """True classes, probabilities and unknown scores (None for a run without them) of labelled files."""
    idx = {c: i for i, c in enumerate(labels)}
    y = np.array([idx[s.label] for s in samples], dtype=int)
    logits, unknown = predictor.split_outputs(predictor.predict_outputs([s.path for s in samples], progress_desc=desc))
    return y, predictor.probs(logits) if len(logits) else logits, unknown


def eval_predictor(run: Path, model, labels: list[str], cfg, few_files: bool = False) -> tuple[Predictor, dict]:
    """The Predictor the final evaluation scores with, and what it is. ONNX Runtime (cfg.eval_engine onnx, or auto
    where the extraction engine resolves to onnx) exports RUN/model.onnx through `classforge export`'s parity
    check first; any failure falls back to PyTorch fp32 with a note. Either way the run's `predict` and server
    then use the same path (they pick model.onnx when it exists). `few_files` (only a parity check of cached
    features to run, unless the user asked for onnx): PyTorch, as exporting costs more than scoring a few files."""
    info: dict = {"engine": "torch-fp32"}
    wanted = "torch" if few_files and cfg.eval_engine == "auto" else cfg.eval_engine
    if resolve_eval_engine(wanted, cfg.extract_engine) == "onnx":
        t = time.time()
        try:
            rep, *_ = export_checked(run, n_parity=16)
            predictor = Predictor.from_run(run, backend="onnx", max_pixels=cfg.max_pixels)
            return predictor, {"engine": "onnxruntime-fp32", "export_s": round(time.time() - t, 2),
                               "parity_max_abs_logit_diff": rep["parity"]["max_abs_diff"]}
        except Exception as e:  # noqa: BLE001 - export/parity/session failure: PyTorch still scores the run
            info["note"] = f"ONNX Runtime evaluation unavailable ({str(e).splitlines()[0][:200]}); scored with PyTorch"
            print(info["note"])
    return Predictor(model, model.backbone.spec, labels, max_pixels=cfg.max_pixels), info


PARITY_FILES = 8  # test files the predictor scores to check logits computed from cached features


def covers_test(feature_logits: dict | None, data) -> bool:
    test = data.of("test")
    return bool(feature_logits) and bool(test) and len(feature_logits.get("test", ())) == len(test)


def parity_files(data) -> list[str]:
    """The test files whose scores from cached features are checked against the predictor's."""
    return [s.path for s in data.of("test")[:PARITY_FILES]]


def predictor_features(backbone, files: list[str], max_pixels: int) -> Future:
    """The backbone's features of `files` the way the Predictor computes them (its decoding and preprocessing,
    fp32 PyTorch): what the shipped model's head turns into its outputs. A linear run's backbone is final before
    its head is fit, so the run computes these in a second thread (one torch thread) while it waits for its cached
    features, and the check in `from_features` needs no forward pass of its own. The module is prepared for the
    predictor here, not beside another user of it."""
    predictor = Predictor(backbone, backbone.spec, [], max_pixels=max_pixels)
    pool = ThreadPoolExecutor(1)
    try:
        return pool.submit(_features_on_one_thread, predictor, files)
    finally:
        pool.shutdown(wait=False)


def _features_on_one_thread(predictor: Predictor, files: list[str]) -> np.ndarray:
    one_torch_thread()
    return predictor.forward(torch.stack([predictor.preprocess(f) for f in files]))


def from_features(predictor: Predictor, data, feature_logits: dict | None) -> dict | None:
    """Whether the head's logits on cached features are the shipped model's: the predictor (the path `predict`
    and the server use) scores a few test files and must agree within the ONNX parity tolerance. Where the run
    computed those files' predictor features beforehand (`predictor_features`), feature_logits["reference"]
    holds the shipped head's outputs on them, and they stand for the predictor's scores."""
    if not covers_test(feature_logits, data):
        return None
    files = parity_files(data)
    k = len(files)
    ref = feature_logits.get("reference")
    if ref is None or len(ref) != k:
        ref = predictor.predict_outputs(files)
    check = parity(ref, feature_logits["test"][:k], classes=len(predictor.labels))
    return {"engine": feature_logits["engine"], "files_checked": k, "max_abs_logit_diff": check["max_abs_diff"],
            "passed": check["passed"]}


def evaluate_run(run: Path, data, cfg, model, extra_timing: dict, t_start: float, extra: dict | None = None,
                 feature_logits: dict | None = None, figures: Figures | None = None) -> dict:
    """Score val and test with the Predictor, or, when the run's cached features are exact (checked on a few
    files), from the logits the head gave them (each file then goes through the backbone once, not twice).
    `figures`: where the figures are drawn (evaluation.figures; default: here)."""
    figures = figures or Figures()
    t = time.time()
    predictor, eval_info = eval_predictor(run, model, data.labels, cfg, few_files=bool(feature_logits))
    results, unknown = scored(predictor, data, feature_logits) if covers_test(feature_logits, data) else ({}, {})
    if results:  # drawn while the few files below are checked; drawn again in the rare case they disagree
        draw_test_figures(figures, run, results["test"], data.labels)
    check = from_features(predictor, data, feature_logits)
    if check is not None:
        eval_info["cached_features"] = check
    if not (check and check["passed"]):
        results, unknown = scored(predictor, data)
        draw_test_figures(figures, run, results["test"], data.labels)
    open_set = measure_open_set(run, predictor, cfg, unknown, figures)
    timing = {"total_s": 0.0, **extra_timing, "eval_s": time.time() - t}
    summary = {
        "task": model.backbone.spec.task, "backbone": cfg.backbone, "strategy": cfg.strategy,
        "classes": len(data.labels), "data": str(cfg.data), "created": dt.datetime.now().isoformat(timespec="seconds"),
        "test": _public(results["test"][3]), "val": _public(results["val"][3]) if "val" in results else None,
        "params": count_params(model), "timing": timing,
        "split": {"method": data.split.method, "counts": data.split.counts, "seed": cfg.seed,
                  "duplicate_clusters": data.split.duplicate_clusters, "excluded": len(data.split.excluded),
                  "warnings": list(getattr(data.split, "warnings", []))},
        "skipped": len(data.checked.skipped), "environment": environment(), "evaluation": eval_info,
        "samples_per_class": {c: int(n) for c, n in zip(data.labels, np.bincount(data.y("train"), minlength=len(data.labels)))},
        **(extra or {}),
    }
    if open_set:
        summary["open_set"] = open_set
    if summary.get("update"):
        summary["update"] = update_figures(summary["update"], *results["test"][:3], data.labels)
    if getattr(cfg, "bins", None):
        ordinal = ordinal_metrics(data.labels, results["test"][1], results["test"][2])
        if ordinal:
            summary["test"]["ordinal"] = ordinal
    summary["warnings"] = run_warnings(summary, results["test"][1])
    write_artifacts(run, summary, data.labels, results, data.checked.skipped, data.split.excluded, data.notes,
                    cfg.top_k, t_start, unknown.get("test"), figures)
    return summary


def scored(predictor: Predictor, data, feature_logits: dict | None = None) -> tuple[dict, dict]:
    """Per split: (samples, true classes, probabilities, metrics), and the unknown scores: from the logits the head
    gave the cached features, or else by the predictor, file by file."""
    results, unknown = {}, {}
    idx = {c: i for i, c in enumerate(data.labels)}
    for split in ("val", "test"):
        ss = data.of(split)
        if not ss:
            continue
        if feature_logits is not None:
            y = np.array([idx[s.label] for s in ss], dtype=int)
            logits, unknown[split] = predictor.split_outputs(feature_logits[split])
            probs = predictor.probs(logits)
        else:
            y, probs, unknown[split] = score(predictor, ss, data.labels, f"Evaluating {split}")
        results[split] = (ss, y, probs, summarize(y, probs, len(data.labels)))
    return results, unknown


def draw_test_figures(figures: Figures, run: Path, test, labels: list[str]) -> None:
    """The confusion matrix and the reliability diagram of the test split."""
    _, y, probs, m = test
    figures.draw("confusion", run / "confusion_matrix.png", np.asarray(m["confusion"]), labels)
    figures.draw("reliability", run / "reliability.png", np.asarray(y), probs)


def measure_open_set(run: Path, predictor: Predictor, cfg, unknown: dict, figures: Figures | None = None
                     ) -> dict | None:
    """Choose the unknown threshold on the validation split's scores, write it into model.json (and model.onnx's
    metadata), score --unknown-dir files if given, and plot the scores. None for a run without the score."""
    if unknown.get("test") is None:
        return None
    if unknown.get("val") is None or not len(unknown["val"]):
        print("No validation files: the run answers with a class whatever the input (no unknown threshold)")
        return None
    threshold = choose_threshold(unknown["val"], cfg.unknown_recall)
    meta = update_run_meta(run, open_set={**_saved_open_set(run), "threshold": threshold})
    predictor.open_set = meta["open_set"]
    if (run / "model.onnx").is_file():
        add_metadata(run / "model.onnx", meta, predictor.labels)
    foreign = None
    if cfg.unknown_dir:
        foreign = unknown_dir_scores(predictor, cfg.unknown_dir)
    result = open_set_summary(threshold, cfg.unknown_recall, unknown["val"], unknown["test"], foreign,
                              cfg.unknown_dir)
    (figures or Figures()).draw("open_set", run / "open_set.png", unknown["test"], threshold, foreign)
    return result


def _saved_open_set(run: Path) -> dict:
    return json.loads((run / "model.json").read_text()).get("open_set") or {}


def unknown_dir_scores(predictor: Predictor, folder: str, batch_size: int = 32) -> np.ndarray:
    """Unknown scores of the files under a folder of no class; unreadable files are left out, and said so."""
    from classforge.core.errors import BadFile
    from classforge.core.progress import progress
    from classforge.data.discover import media_files

    files = media_files(folder, predictor.spec.task)
    if not files:
        raise ClassforgeError(f"--unknown-dir {folder} holds no {predictor.spec.task} files")
    xs, bad, scores = [], 0, []
    for f in progress(files, total=len(files), desc="Scoring --unknown-dir", unit="file"):
        try:
            xs.append(predictor.preprocess(f))
        except BadFile:
            bad += 1
        if len(xs) == batch_size:
            scores.append(predictor.split_outputs(predictor.forward(torch.stack(xs)))[1])
            xs = []
    if xs:
        scores.append(predictor.split_outputs(predictor.forward(torch.stack(xs)))[1])
    if bad:
        print(f"--unknown-dir: {bad} unreadable file(s) left out")
    return np.concatenate(scores) if scores else np.zeros(0, np.float32)


def write_artifacts(run: Path, summary: dict, labels: list[str], results: dict, skipped, excluded, notes,
                    top_k: int, t_start: float, unknown_scores: np.ndarray | None = None,
                    figures: Figures | None = None) -> None:
    figures = figures or Figures()
    ss, y, probs, m = results["test"]
    open_set = summary.get("open_set")
    rp.write_predictions(run / "predictions.csv", [s.rel for s in ss], labels, y, probs, top_k,
                         unknown_scores if open_set else None, (open_set or {}).get("threshold"))
    rp.write_per_class(run / "per_class.csv", labels, m["per_class"])
    if not figures.asked(run / "confusion_matrix.png"):
        draw_test_figures(figures, run, results["test"], labels)
    if not figures.asked(run / "curves.png"):
        figures.draw("curves", run / "curves.png", read_metrics(run / "metrics.csv"))
    mistakes = rp.worst_mistakes(ss, labels, y, probs)
    summary["timing"]["total_s"] = time.time() - t_start
    (run / "summary.json").write_text(json.dumps(summary, indent=2))
    figures.wait()  # the report embeds them
    sections = [candidates_section(summary["auto"])] if summary.get("auto") else []
    sections += [update_section(summary["update"])] if summary.get("update") else []
    sections += [open_set_section(run, open_set)] if open_set else []
    rp.write_html(run, summary, labels, m["per_class"], mistakes, skipped, excluded, notes, summary["task"],
                  sections, confusion=m["confusion"])


def read_metrics(path: Path) -> list[dict]:
    import csv

    if not path.exists():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def evaluate(run_dir: str | Path, data: str | None = None, out: str | Path | None = None, **discover_kw) -> dict:
    """Re-score a finished run on any folder (all its files count as test), or on its own test split."""
    run = Path(run_dir)
    predictor = Predictor.from_run(run)
    labels = predictor.labels
    t0 = time.time()
    if data is None:
        cfg = TrainConfig.load(run / "config.yaml")
        data = cfg.data
        if not data and not cfg.labels_csv:
            raise ClassforgeError("Give a DATA_DIR: this run does not record its data folder")
        ds = discover(cfg.data, cfg.labels_csv, cfg.label_from_name, cfg.bins, cfg.classes, cfg.max_classes)
        split_rows = _read_split(run / "split.csv")
        samples = [s for s in ds.samples if split_rows.get(s.rel) == "test"]
    else:
        ds = discover(data, **discover_kw)
        samples = ds.samples
    ds.samples = samples
    checked = validate(ds)
    unknown = sorted({s.label for s in checked.good} - set(labels))
    good = [s for s in checked.good if s.label in set(labels)]
    if not good:
        raise ClassforgeError(f"No files of this run's classes ({', '.join(labels[:10])}...) found in {data}")
    y, probs, _ = score(predictor, good, labels, "Evaluating")
    m = summarize(y, probs, len(labels))
    out = Path(out) if out else run / "evaluations" / Path(str(data)).name
    out.mkdir(parents=True, exist_ok=True)
    summary = {"task": predictor.spec.task, "backbone": predictor.meta["backbone"], "strategy": "evaluate",
               "evaluation": {"engine": "onnxruntime-fp32" if predictor.backend == "onnxruntime" else "torch-fp32"},
               "classes": len(labels), "data": str(data), "created": dt.datetime.now().isoformat(timespec="seconds"),
               "test": _public(m), "val": None, "params": {"total": 0, "trainable": 0},
               "timing": {"total_s": 0.0}, "backend": predictor.backend}
    notes = [f"classes not known to the model were skipped: {unknown}"] if unknown else []
    write_artifacts(out, summary, labels, {"test": (good, y, probs, m)}, checked.skipped, [], notes, 3, t0)
    return {"out": str(out), **summary}


def _read_split(path: Path) -> dict[str, str]:
    import csv

    if not path.exists():
        return {}
    with open_csv(path) as f:
        return {r["path"]: r["split"] for r in csv.DictReader(f)}


def split_samples(run: Path, data: str | None, splits: tuple[str, ...],
                  hint: str = "") -> tuple[dict[str, list], str]:
    """The run's files of each split (split.csv), found again under its data folder (or `data`, if it moved),
    readable ones only; and the folder. `hint` ends the error messages (what else the command can do)."""
    cfg = TrainConfig.load(run / "config.yaml") if (run / "config.yaml").is_file() else None
    root = data or (cfg.data if cfg else None)
    if not root and not (cfg and cfg.labels_csv):
        raise ClassforgeError(f"{run} does not record its data folder: give it with --data DIR")
    if root and not Path(root).is_dir():
        raise ClassforgeError(f"data folder {root} not found: give the run's data folder with --data DIR{hint}")
    rows = _read_split(run / "split.csv")
    if not rows:
        raise ClassforgeError(f"{run}/split.csv is missing or empty: the run's splits are unknown{hint}")
    if cfg is not None:
        ds = discover(root or cfg.data, cfg.labels_csv, cfg.label_from_name, cfg.bins, cfg.classes, cfg.max_classes)
    else:
        ds = discover(root)
    ds.samples = [s for s in ds.samples if rows.get(s.rel) in splits]
    good = validate(ds).good
    out = {sp: [s for s in good if rows.get(s.rel) == sp] for sp in splits}
    return out, str(root)
