"""`classforge update RUN DATA --out NEW_RUN`: add files, or whole new classes, to a linear or two-stage run in
seconds. The backbone stays as the run has it, so every file it already embedded comes from the embedding cache;
files the run knew keep their split, new files are split as a fresh run would split them, and the head is refit
from the run's own (its rows for the old classes kept, new rows from zero). The new run is evaluated on old and
new classes alike, and its summary and report say what changed against the old run."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

from classforge.core.config import TrainConfig, parse_fractions
from classforge.core.errors import ClassforgeError
from classforge.core.files import open_csv
from classforge.data.discover import discover
from classforge.data.ops import attach_ops
from classforge.data.split import SplitReport, make_split
from classforge.data.validate import file_sha1, validate
from classforge.models.registry import Classifier
from classforge.runtime.predictor import load_run_model
from classforge.runtime.threads import adapted_threads
from classforge.training.flow import fit_and_evaluate
from classforge.training.prepared import Prepared
from classforge.training.run import check_out

UPDATABLE = ("linear", "two-stage")


def update_run(run_dir: str | Path, data: str | None, out: str | Path, **options) -> Path:
    """Write NEW_RUN (out) from RUN and DATA (default: the run's own data folder, as it is now)."""
    old = Path(run_dir)
    if not (old / "config.yaml").is_file():
        raise ClassforgeError(f"{old} is not a classforge run directory (missing config.yaml)")
    base = TrainConfig.load(old / "config.yaml")
    if base.strategy not in UPDATABLE:
        raise ClassforgeError(f"{old} is a {base.strategy} run: update refits the head of a linear or two-stage "
                              "run on its backbone's embeddings; train again instead")
    if Path(out).resolve() == old.resolve():
        raise ClassforgeError("--out must be a new folder: the run being updated stays as it is")
    cfg = base.replace(data=str(data or base.data), out=str(out), resume=False, **options)
    check_out(cfg)
    model, meta, old_labels = load_run_model(old)
    reuse_backbone(model, meta, base, old)
    with adapted_threads(cfg.threads) as threads:
        t0 = time.time()
        prepared = prepare_update(cfg, old, old_labels)
        model = widened(model, old_labels, prepared.labels)
        change = what_changed(old, prepared, old_labels)
        added = ", ".join(change["classes_added"])
        print(f"Updating {old}: {change['files_added']} new file(s); "
              + (f"new classes: {added}" if added else "no new class"))
        run = Path(cfg.out)
        run.mkdir(parents=True, exist_ok=True)
        # the head alone is refit, whatever the run's strategy: linear from here on
        return fit_and_evaluate(cfg.replace(strategy="linear"), run, prepared, model, threads, t0, update=change)


def reuse_backbone(model: Classifier, meta: dict, cfg: TrainConfig, run: Path) -> None:
    """The run's backbone as the embedding cache knows it: the source of its weights (pretrained ones for a
    linear run; a backbone that trained with its head has embeddings of its own, keyed by the run's weights)
    and the preprocessing ops of its input spec."""
    if cfg.preprocess:
        attach_ops(model.backbone, cfg.preprocess)
    if cfg.strategy == "linear":
        model.backbone.weights_source = meta.get("weights_source", model.backbone.weights_source)
    else:
        model.backbone.weights_source = f"run:{file_sha1(str(run / 'model.safetensors'))[:16]}"


def prepare_update(cfg: TrainConfig, old: Path, old_labels: list[str]) -> Prepared:
    """DATA discovered and checked; the run's files keep their split (split.csv), the others are split on their
    own with the run's fractions and seed. The old classes keep their order; new ones follow."""
    ds = discover(cfg.data, cfg.labels_csv, cfg.label_from_name, cfg.bins, None, None, cfg.group_by)
    checked = validate(ds, cfg.min_size, cfg.max_pixels)
    known = read_splits(old / "split.csv")
    old_files = [s for s in checked.good if s.rel in known]
    for s in old_files:
        s.split = known[s.rel]
    old_sha = {checked.info[s.path].sha1 for s in old_files}
    new = [s for s in checked.good if s.rel not in known and checked.info[s.path].sha1 not in old_sha]
    notes = list(ds.notes)
    gone = len(known) - len(old_files)
    if gone:
        notes.append(f"{gone} file(s) of {old.name} are not in {cfg.data} any more: left out")
    notes += split_new(new, checked.info, cfg)
    samples = [s for s in old_files + new if s.split]
    added = sorted({s.label for s in new if s.split == "train"} - set(old_labels), key=ds.classes.index)
    labels = list(old_labels) + added
    samples = [s for s in samples if s.label in set(labels)]
    untrained = sorted({s.label for s in new} - set(labels))
    if untrained:
        notes.append(f"new classes with no training file were left out: {untrained}")
    counts = {sp: sum(s.split == sp for s in samples) for sp in ("train", "val", "test")}
    report = SplitReport(counts, f"kept from {old.name}; {len(new)} new file(s) split on their own")
    return Prepared(ds, checked, report, labels, samples, notes)


def split_new(new: list, info: dict, cfg: TrainConfig) -> list[str]:
    """Split the new files as a fresh run would; too few to split all go to training."""
    if not new:
        return []
    for s in new:
        s.group = s.group or ""
    try:
        report = make_split(new, info, parse_fractions(cfg.split), cfg.seed, None, cfg.near_dup_distance)
    except ClassforgeError:
        for s in new:
            s.split = "train"
        return [f"{len(new)} new file(s): too few to split, all used for training"]
    return [f"new files: {report.method}"] + report.notes


def widened(model: Classifier, old_labels: list[str], labels: list[str]) -> Classifier:
    """The run's model with a head for `labels`: the old classes' rows as they were, new rows zero (the refit
    starts from the run's decisions)."""
    import torch

    grown = Classifier(model.backbone, len(labels))
    grown.dropout = model.dropout
    with torch.no_grad():
        grown.head.weight.zero_()
        grown.head.bias.zero_()
        grown.head.weight[:len(old_labels)] = model.head.weight
        grown.head.bias[:len(old_labels)] = model.head.bias
    return grown


def what_changed(old: Path, prepared: Prepared, old_labels: list[str]) -> dict:
    """What the summary and report compare: the old run, the classes and files added, the old test accuracy."""
    known = read_splits(old / "split.csv")
    summary = json.loads((old / "summary.json").read_text()) if (old / "summary.json").is_file() else {}
    added = [s for s in prepared.samples if s.rel not in known]
    per_split = {sp: sum(s.split == sp for s in added) for sp in ("train", "val", "test")}
    # Refitting the old classes' rows changes old decisions even when nothing new is known about them (the
    # features' standardisation moves with the new files): they stay as they were unless new training files
    # of old classes arrived.
    old_classes_grew = any(s.split == "train" and s.label in set(old_labels) for s in added)
    return {"from": str(old), "old_classes": list(old_labels), "classes_added": prepared.labels[len(old_labels):],
            "old_rows": "refit" if old_classes_grew else "kept",
            "frozen_rows": 0 if old_classes_grew else len(old_labels),
            "files_added": len(added), "files_added_per_split": per_split,
            "old_test_accuracy": (summary.get("test") or {}).get("accuracy"),
            "old_test_files": sorted(s.rel for s in prepared.samples if s.split == "test" and s.rel in known)}


def read_splits(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise ClassforgeError(f"{path} is missing: the run's splits are unknown, so it cannot be updated")
    with open_csv(path) as f:
        return {r["path"]: r["split"] for r in csv.DictReader(f)}
