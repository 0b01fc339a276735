"""The steps of a run once its data are prepared: resolve the options for the data, build the model, fit a
strategy (a head on cached embeddings, or Lightning for the networks), then save and score the run. `training.run`
strings them together for one strategy, `training.auto` for several candidates, `training.update` to refit a head."""


from __future__ import annotations

import csv
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from classforge.core.config import TrainConfig
from classforge.core.errors import ClassforgeError
from classforge.core.files import open_csv
from classforge.core.progress import Progress, progress, quiet, summary_line
from classforge.data.discover import Sample
from classforge.data.ops import attach_ops
from classforge.data.preprocess import make_preprocessor
from classforge.data.split import write_split
from classforge.data.validate import FileInfo, file_sha1
from classforge.evaluation.evaluate import evaluate_run, parity_files, predictor_features, read_metrics
from classforge.evaluation.figures import Figures
from classforge.models.registry import (
    Classifier,
    backbone_task,
    count_params,
    create_backbone,
    default_backbone,
    is_budget_aware,
)
from classforge.models.registry import entry as registry_entry
from classforge.runtime import embeddings as emb
from classforge.runtime.distributed import current
from classforge.runtime.engines import engine_for, exact_engine
from classforge.training.checkpoints import checkpoint_dir
from classforge.training.head import fit_head
from classforge.training.open_set import attach_open_set
from classforge.training.prepared import Prepared, audio_kwargs, class_weights, views_per_class
from classforge.training.tracking import track_run
from classforge.training.tricks import check_tricks


def build_for(cfg: TrainConfig, data: Prepared) -> tuple[TrainConfig, Classifier]:
    """The model a resolved config describes (its backbone with pretrained weights unless from scratch), checked
    against the parameter budget and the training tricks; the config as the tricks leave it."""
    if cfg.augment_to:
        add_offline_variants(data, cfg)
    backbone = create_backbone(cfg.backbone, pretrained=cfg.pretrained and cfg.strategy != "scratch",
                               weights=cfg.weights, **backbone_kwargs(cfg, len(data.labels)))
    if cfg.preprocess:
        attach_ops(backbone, cfg.preprocess)  # into the InputSpec: model.json, cache key, every preprocessor
    model = Classifier(backbone, len(data.labels), cfg.dropout)
    check_budget(cfg, model)
    cfg = check_tricks(cfg, backbone.spec)  # before any stage: two-stage would otherwise fail after its embeddings
    return cfg, model


@dataclass
class Fitted:
    """A strategy's result before it is saved and scored."""

    cfg: TrainConfig
    model: Classifier
    history: list[dict] = field(default_factory=list)
    timing: dict = field(default_factory=lambda: {"embedding_s": 0.0, "fit_s": 0.0})
    extra: dict = field(default_factory=dict)
    features: dict = field(default_factory=dict)  # cached features per split (train; val/test when exact)


def fit_and_evaluate(cfg: TrainConfig, run: Path, data: Prepared, model: Classifier, threads: dict,
                     t0: float, update: dict | None = None) -> Path:
    """Write the config and split, fit the strategy, then save and score the run. `update` (from `classforge
    update`): the head starts from the model's current one, and the summary and report compare with the run it
    updates."""
    if is_global_zero():
        cfg.save(run / "config.yaml")
        write_split(run / "split.csv", data.samples)
    # the process that draws the figures loads matplotlib while the strategy fits
    figures = Figures.start() if is_global_zero() else Figures()
    try:
        fitted = fit_strategy(cfg, run, data, model, threads, t0, update)
        data.release_kept()
        if not is_global_zero():
            return run  # DDP workers stop here; rank 0 saves and evaluates
        return finish_run(run, data, fitted, t0, figures)
    finally:
        figures.close()


def fit_strategy(cfg: TrainConfig, run: Path, data: Prepared, model: Classifier, threads: dict, t0: float,
                 update: dict | None = None) -> Fitted:
    """Train `model` the way cfg.strategy says (checkpoints and per-epoch files go by `run`)."""
    f = Fitted(cfg, model, extra={"threads": threads, "started_at": t0})  # started_at: --time-budget is the run's
    if update:
        f.extra["update"] = update
    if cfg.strategy in ("linear", "two-stage"):
        f.history += fit_head_on_embeddings(model, data, cfg, run, f.timing, f.extra, f.features,
                                            warm_start=bool(update), frozen_rows=(update or {}).get("frozen_rows", 0))
    if cfg.strategy in ("finetune", "two-stage", "scratch"):
        t = time.time()
        f.history += fit_network(model, data, cfg, run, cfg.strategy, f.extra)
        f.timing["fit_s"] += time.time() - t
    f.extra.pop("started_at", None)
    return f


def finish_run(run: Path, data: Prepared, f: Fitted, t0: float, figures: Figures | None = None) -> Path:
    """Fit the unknown score, save the model, score it, write the report. `figures`: where the figures are drawn
    (evaluation.figures; default: here)."""
    cfg, model = f.cfg, f.model
    linear = cfg.strategy == "linear"  # only then are the cached features the final backbone's
    figures = figures or Figures()
    write_metrics(run, f.history)
    figures.draw("curves", run / "curves.png", read_metrics(run / "metrics.csv"))
    t = time.time()
    open_set = attach_open_set(model, data, cfg, f.features.get("train") if linear else None)
    f.timing["fit_s"] += time.time() - t
    save_model(run, model, cfg, data.labels, open_set)
    summary = evaluate_run(run, data, cfg, model, extra_timing=f.timing, t_start=t0, extra=f.extra,
                           feature_logits=outputs_from_features(model, f.features) if linear else None,
                           figures=figures)
    print_summary(run, summary)
    if cfg.track:
        track_run(run, cfg.track, cfg.track_uri)
    settle_checkpoints(run, cfg)
    return run


@torch.inference_mode()
def outputs_from_features(model: Classifier, features: dict) -> dict | None:
    """The shipped model's val/test outputs (logits [+ unknown score]) from exact cached features: the scoring
    pass need not run the backbone again. None when the features came from an inexact engine."""
    if "engine" not in features:
        return None
    out: dict = {"engine": features["engine"]}
    for split in ("val", "test"):
        out[split] = head_outputs(model, features[split])
    reference = reference_features(features)
    if reference is not None:
        out["reference"] = head_outputs(model, reference)
    return out


@torch.inference_mode()
def head_outputs(model: Classifier, features: np.ndarray) -> np.ndarray:
    """What the shipped model outputs for backbone features: the head's logits [+ the unknown score]."""
    f = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    logits = model.head(f).float()
    cols = [logits] if getattr(model, "open_set", None) is None else [logits, model.open_set(f)[:, None]]
    return torch.cat(cols, 1).numpy()


def reference_features(features: dict) -> np.ndarray | None:
    """The predictor's features of the parity files, computed while the run waited; None where that failed (the
    check then runs the predictor itself, and reports what goes wrong)."""
    future = features.get("reference")
    try:
        return None if future is None else future.result()
    except Exception:  # noqa: BLE001 - see above
        return None


def settle_checkpoints(run: Path, cfg: TrainConfig) -> None:
    """A run that succeeded needs no checkpoint (model.safetensors is the model): they go, unless kept."""
    where = checkpoint_dir(run)
    if not where.exists():
        return
    if cfg.keep_checkpoints:
        print(f"Checkpoints kept for --resume: {where}")
    else:
        shutil.rmtree(where, ignore_errors=True)


def resolve_for_data(cfg: TrainConfig, data: Prepared) -> TrainConfig:
    """Defaults that depend on the data and on what the backbone declares: the task's default backbone, the
    strategy (linear where there are pretrained weights), the audio clip length, architecture defaults and the
    backbone's recipe for the strategy (only where the user left a key at its default)."""
    changes: dict = {}
    name = cfg.backbone if cfg.backbone not in ("auto", "") else default_backbone(data.ds.task)
    changes["backbone"] = name
    entry = registry_entry(name)
    if cfg.strategy == "auto":
        no_weights = entry is not None and not entry.pretrained and not cfg.weights
        changes["strategy"] = "scratch" if no_weights else "linear"
    strategy = changes.get("strategy", cfg.strategy)
    if backbone_task(name) != data.ds.task:
        raise ClassforgeError(f"{name} is a {backbone_task(name)} backbone but {data.ds.root} holds {data.ds.task} "
                              f"files; try --backbone {default_backbone(data.ds.task)}")
    if data.ds.task == "audio" and cfg.clip_seconds == "longest":
        longest = max(data.checked.info[s.path].duration_s for s in data.of("train"))
        changes["clip_seconds"] = round(longest, 3)
        data.notes.append(f"--clip-seconds longest: {longest:.2f} s (the longest training recording)")
    if entry is not None:
        args = {**entry.default_args, **cfg.backbone_args}
        if strategy != "linear" and cfg.augment != "none":
            args = {**entry.train_args, **args}
        if args != dict(cfg.backbone_args):
            changes["backbone_args"] = args
        defaults = TrainConfig()
        changes.update({k: v for k, v in entry.recipe(strategy).items() if getattr(cfg, k) == getattr(defaults, k)})
    return cfg.replace(**changes)


def add_offline_variants(data: Prepared, cfg: TrainConfig) -> None:
    """--augment-to N: N augmented copies of every *training* recording, written to the cache. Each copy
    inherits its source's label, group and split, so no variant of a val/test recording is ever trained on."""
    if data.ds.task != "audio":
        raise ClassforgeError("--augment-to writes audio variants; for images use --views K or --balance")
    from classforge.data.audio import augment_to_variants, load_audio  # the audio extra (soundfile, soxr)

    sr = create_spec_rate(cfg)
    train = data.of("train")
    waves = [(s.path, load_audio(s.path, sr)) for s in progress(train, total=len(train), desc="Decoding sources")]
    level = cfg.augment if cfg.augment in ("light", "strong") else "strong"
    variants = augment_to_variants(waves, cfg.augment_to, sr, level=level,
                                   background_dir=cfg.background_dir, seed=cfg.seed)
    added = []
    for s, paths in zip(train, variants):
        for k, p in enumerate(paths):
            v = Sample(p, f"{s.rel}#variant{k:02d}", s.label, s.group, "train")
            src = data.checked.info[s.path]
            data.checked.info[p] = FileInfo(v.rel, True, sha1=file_sha1(p), duration_s=src.duration_s,
                                            sample_rate=sr, channels=1, format="WAV")
            added.append(v)
    data.samples += added
    data.notes.append(f"--augment-to {cfg.augment_to}: {len(added)} variants of {len(train)} training recordings "
                      "(none of validation or test recordings)")


def create_spec_rate(cfg: TrainConfig) -> int:
    bb = create_backbone(cfg.backbone, pretrained=False, **backbone_kwargs(cfg, 0))
    return bb.spec.sample_rate


def backbone_kwargs(cfg: TrainConfig, num_classes: int) -> dict:
    """Architecture arguments saved in model.json, so that a run rebuilds exactly the trained network."""
    kw = dict(cfg.backbone_args)
    if cfg.clip_seconds:
        kw["clip_seconds"] = float(cfg.clip_seconds)
    if is_budget_aware(cfg.backbone) and num_classes:
        kw["num_classes"] = num_classes
        if cfg.max_params:
            kw["fit_budget" if cfg.fit_budget else "max_params"] = cfg.max_params
    return kw


def check_budget(cfg: TrainConfig, model: Classifier) -> None:
    n = count_params(model)["total"]
    if cfg.max_params and n > cfg.max_params:
        raise ClassforgeError(f"{cfg.backbone} with its head has {n:,} parameters, over --max-params "
                              f"{cfg.max_params:,}; --fit-budget scales the from-scratch cnn* backbones to fit")


def is_global_zero() -> bool:
    if current().world_size > 1:
        return current().is_main
    return int(os.environ.get("RANK", os.environ.get("GLOBAL_RANK", "0"))) == 0 and \
        int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0


# ----------------------------------------------------------------------------------------------- strategies


def fit_head_on_embeddings(model: Classifier, data: Prepared, cfg: TrainConfig, run: Path, timing: dict,
                           extra: dict, features: dict, warm_start: bool = False, frozen_rows: int = 0) -> list[dict]:
    """Frozen backbone run once per file (cached on disk); the head trains on the cached tensors. `features`
    gets the training files' clean-view features, and for a linear run (whose val and test files an exact fp32
    engine embeds) the val/test features too: no file then goes through the backbone a second time for scoring."""
    bb = model.backbone
    group = current()  # several processes: each embeds its share of the files (runtime.distributed)
    engine = engine_for(cfg.extract_engine, group.device)
    engines = {"train": engine, "val": engine}
    exact = (engine if engine.exact else exact_engine(group.device)) if cfg.strategy == "linear" else None
    if exact is not None:
        engines.update(val=exact, test=exact)
    pre = make_preprocessor(bb.spec, augment=cfg.augment if cfg.augment != "none" else "light",
                            max_pixels=cfg.max_pixels, seed=cfg.seed, kept=data.kept, **audio_kwargs(cfg))
    views = views_per_class(data, cfg)
    t = time.time()
    feats = {}
    arch = json.dumps(backbone_kwargs(cfg, 0))
    extra["embeddings"] = {"cached": 0, "computed": 0, "views": views, "engine": engine.key,
                           "key": emb.features_key(cfg.backbone, bb, arch, engine),
                           "world_size": group.world_size}
    if exact is not None and group.is_main and data.of("test"):  # the parity check's forward pass, while waiting
        features["reference"] = predictor_features(bb, parity_files(data), cfg.max_pixels)
    ahead = wait_for_features_ahead(data)
    for splits, eng, n_views in extraction_passes(engines, views):
        parts = [data.of(split) for split in splits]
        ss = [s for part in parts for s in part]
        key = emb.features_key(cfg.backbone, bb, arch, eng)
        sha = [data.checked.info[s.path].sha1 for s in ss]
        names = ", ".join(splits)
        out, stats = emb.extract(bb, ss, sha, pre, key, n_views, cfg.batch_size, desc=f"Embedding {names}",
                                 engine=eng, group=group)
        count_ahead(stats, ahead, key, sha)
        start = 0
        for split, part in zip(splits, parts):
            feats[split], start = out[start:start + len(part)], start + len(part)
        others = stats.get("by_others", 0)
        print(f"  {names}: {len(ss)} files, {stats['cached']} embeddings from cache, {stats['computed']} computed"
              + (f" ({stats['ahead']} of them beside the imports)" if stats.get("ahead") else "")
              + (f" ({stats['computed'] - others} here, {others} by the other {group.world_size - 1} "
                 f"process{'es' if group.world_size > 2 else ''})" if group.world_size > 1 and others else ""))
        add_extraction_stats(extra["embeddings"], stats)
    model.backbone.cpu()  # a GPU engine moved it; fitting and scoring the head run on the CPU
    if "per_process" in extra["embeddings"]:
        extra["embeddings"]["per_process"] = list(extra["embeddings"]["per_process"].values())
    timing["embedding_s"] += time.time() - t
    loop_s = extra["embeddings"].get("loop_s", 0) + extra["embeddings"].get("ahead_loop_s", 0)
    if loop_s:
        extra["embeddings"]["files_per_s"] = round(extra["embeddings"]["computed"] / loop_s, 1)
    for note in {e.note for e in engines.values() if e.note}:
        data.notes.append(note)
    if extra["embeddings"].get("missing_from_shared_cache"):
        data.notes.append(f"{extra['embeddings']['missing_from_shared_cache']} embeddings the other processes "
                          "computed were not in this process's cache and were computed again here: put "
                          "CLASSFORGE_CACHE on storage every node sees")
    if not group.is_main:
        # the main process fits the head and scores the run; in two-stage its head reaches the others when
        # data-parallel training starts (DDP copies rank 0's weights to every process)
        return []
    ytr = np.repeat(np.array(data.y("train")), feats["train"].shape[1])
    xtr = feats["train"].reshape(-1, feats["train"].shape[-1])
    xva, yva = feats["val"][:, 0], np.array(data.y("val"))
    t = time.time()
    hist = fit_head(model.head, xtr, ytr, xva, yva, cfg, run, class_weights(data, cfg), warm_start, frozen_rows)
    timing["fit_s"] += time.time() - t
    features["train"] = feats["train"][:, 0]
    if exact is not None and exact.exact:
        extra["embeddings"]["scoring_engine"] = exact.key
        features.update(val=feats["val"][:, 0], test=feats["test"][:, 0], engine=exact.key)
    return hist


def wait_for_features_ahead(data: Prepared) -> dict | None:
    """The features the check process computes while the run loads (runtime.ahead), once it is done; its progress
    is shown while the run waits."""
    bar = None

    def shown(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = Progress(None, total=total, desc="Embedding beside the imports", summary=False)
        bar.update(done - bar.done)

    ahead = data.features_ahead(shown)
    if bar is not None:
        bar.close()
    if ahead and ahead.get("sha1s") and not quiet():
        print(summary_line("Embedding beside the imports", len(ahead["sha1s"]), "file", ahead["loop_s"]),
              file=sys.stderr)
    return ahead


def count_ahead(stats: dict, ahead: dict | None, key: str, sha1s: list[str]) -> None:
    """Files whose features the check process computed were found in the cache: count them as computed (and how
    many were), not as cached; with their time."""
    if not ahead or ahead.get("key") != key:
        return
    mine = set(ahead["sha1s"])
    n = min(stats["cached"], sum(h in mine for h in sha1s))
    if n:
        stats.update(cached=stats["cached"] - n, computed=stats["computed"] + n, ahead=n,
                     ahead_build_s=ahead["build_s"], ahead_loop_s=ahead["loop_s"])


def extraction_passes(engines: dict, train_views: int) -> list[tuple[list[str], object, int]]:
    """(splits, engine, views) per extraction pass: the splits that one engine embeds with as many views go
    through one pass, so that decoding and the forward passes run as one pipeline, without a drain per split."""
    passes: dict = {}
    for split, eng in engines.items():
        n_views = train_views if split == "train" else 1
        passes.setdefault((id(eng), n_views), ([], eng, n_views))[0].append(split)
    return list(passes.values())


def add_extraction_stats(total: dict, stats: dict) -> None:
    """Sum one split's extraction figures into the run's; with several processes, each one's own files and speed."""
    for k in ("cached", "computed"):
        total[k] += stats[k]
    for k in ("build_s", "loop_s"):  # the engine's one-time export/trace; decoding + forward passes
        total[k] = round(total.get(k, 0.0) + stats.get(k, 0.0), 3)
    if stats.get("ahead"):  # in the check process (runtime.ahead), once for all splits
        total["ahead"] = total.get("ahead", 0) + stats["ahead"]
        total["ahead_build_s"], total["ahead_loop_s"] = stats["ahead_build_s"], stats["ahead_loop_s"]
    if stats.get("missing"):
        total["missing_from_shared_cache"] = total.get("missing_from_shared_cache", 0) + stats["missing"]
    for r in stats.get("per_process", []):
        mine = total.setdefault("per_process", {}).setdefault(r["rank"], {"rank": r["rank"], "computed": 0,
                                                                          "loop_s": 0.0})
        mine["computed"] += r["computed"]
        mine["loop_s"] = round(mine["loop_s"] + r["loop_s"], 3)
        mine["files_per_s"] = round(mine["computed"] / mine["loop_s"], 1) if mine["loop_s"] else None


def fit_network(model: Classifier, data: Prepared, cfg: TrainConfig, run: Path, stage: str, extra: dict,
                warm_start: bool = False) -> list[dict]:
    # Lightning (seconds of imports) loads only for the strategies that train the network itself
    from classforge.training.fit import fit_lightning

    return fit_lightning(model, data, cfg, run, stage, extra, warm_start)


def save_model(run: Path, model: Classifier, cfg: TrainConfig, labels: list[str], open_set: dict | None = None) -> None:
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # ONNX files exported from earlier weights (a resumed run) no longer match: predict would pick them up
    for stale in ("model.onnx", "model.int8.onnx", "export.json"):
        (run / stale).unlink(missing_ok=True)
    save_file(sd, str(run / "model.safetensors"))
    meta = {"backbone": cfg.backbone, "backbone_kwargs": backbone_kwargs(cfg, len(labels)),
            "num_classes": len(labels), "dropout": cfg.dropout, "spec": model.backbone.spec.to_dict(),
            "task": model.backbone.spec.task, "weights_source": model.backbone.weights_source,
            "format": "classforge-run/1"}
    if model.open_set is not None:  # its buffers are in the weights; the evaluation adds the threshold
        meta["open_set"] = open_set or {"score": "mahalanobis"}
    (run / "model.json").write_text(json.dumps(meta, indent=2))
    (run / "labels.json").write_text(json.dumps(labels, indent=2))


def write_metrics(run: Path, history: list[dict]) -> None:
    keys = ["stage", "epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_time_s"]
    extra = sorted({k for h in history for k in h} - set(keys))
    with open_csv(run / "metrics.csv", "w") as f:
        w = csv.DictWriter(f, fieldnames=keys + extra)
        w.writeheader()
        for h in history:
            w.writerow({k: h.get(k, "") for k in keys + extra})


def print_summary(run: Path, s: dict) -> None:
    t = s["test"]
    lo, hi = t["accuracy_ci95"]
    ev = s.get("evaluation", {})
    how = ev.get("engine", "torch-fp32")
    if ev.get("cached_features", {}).get("passed"):
        how = f"the head on cached {ev['cached_features']['engine']} features (checked against {how})"
    print(f"\nTest accuracy {t['accuracy']:.3f} (95% CI {lo:.3f}-{hi:.3f}, n={t['n']}), macro F1 {t['macro_f1']:.3f}, "
          f"ECE {t['ece']:.3f}; total {s['timing']['total_s']:.1f}s; scored with {how}")
    if t.get("ordinal"):
        print(f"Within one bin {t['ordinal']['within_one_bin']:.3f}, mean error "
              f"{t['ordinal']['mean_abs_bin_error']:.2f} bins (exact {t['accuracy']:.3f})")
    if s.get("skipped"):
        print(f"{s['skipped']} file(s) skipped (unreadable or not data): listed with reasons under 'Skipped files' "
              f"in {run / 'report.html'}")
    for warning in s.get("warnings", []):
        print(f"Warning: {warning}")
    print(f"Report: {(run / 'report.html').resolve()}")
