"""The training flow, top to bottom: discover -> validate -> split -> fit (strategy) -> save -> evaluate."""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from classforge.config import TrainConfig, parse_fractions
from classforge.data.discover import Dataset, Sample, discover
from classforge.data.preprocess import make_preprocessor
from classforge.data.split import SplitReport, make_split, read_split, write_split
from classforge.data.validate import Validation, validate
from classforge.models.registry import ClassforgeError, Classifier, count_params, create_backbone
from classforge.progress import progress
from classforge.training import embeddings as emb
from classforge.training.schedules import parse_progressive

STRATEGIES = ("linear", "finetune", "two-stage", "scratch")
DEFAULT_EPOCHS = {"linear": 60, "finetune": 8, "two-stage": 6, "scratch": 30}
DEFAULT_LR = {"linear": 3e-3, "finetune": 1e-3, "two-stage": 3e-4, "scratch": 2e-3}
DEFAULT_BACKBONE_LR_MULT = 0.1  # fine-tuning: backbone LR = lr x this (images; audio: AUDIO_FINETUNE)
AUDIO_FINETUNE = {"epochs": 15, "lr": "3e-3", "backbone_lr_mult": 0.3}  # pretrained audio backbones, --strategy finetune


@dataclass
class Prepared:
    """Data after discovery, validation and splitting: what every strategy starts from."""

    ds: Dataset
    checked: Validation
    split: SplitReport
    labels: list[str]
    samples: list[Sample]  # with split set; excluded ones dropped
    notes: list[str] = field(default_factory=list)

    def of(self, split: str) -> list[Sample]:
        return [s for s in self.samples if s.split == split]

    def y(self, split: str) -> list[int]:
        idx = {c: i for i, c in enumerate(self.labels)}
        return [idx[s.label] for s in self.of(split)]


def prepare_data(cfg: TrainConfig) -> Prepared:
    ds = discover(cfg.data, cfg.labels_csv, cfg.label_from_name, cfg.bins, cfg.classes, cfg.max_classes, cfg.group_by)
    if cfg.resplit:
        for s in ds.samples:
            s.split = ""
        ds.notes = [n for n in ds.notes if "val/" not in n and "test/" not in n]
        ds.notes.append("--resplit: the folders' own train/val/test split was ignored")
    checked = validate(ds, cfg.min_size, cfg.max_pixels)
    if not checked.good:
        raise ClassforgeError(f"No usable files in {ds.root}: all {len(ds.samples)} failed validation")
    if cfg.split_file:
        report = read_split(cfg.split_file, checked.good)
    else:
        report = make_split(checked.good, checked.info, parse_fractions(cfg.split), cfg.seed, cfg.test_groups,
                            cfg.near_dup_distance)
    samples = [s for s in checked.good if s.split]
    labels = sorted({s.label for s in samples if s.split == "train"}, key=ds.classes.index)
    notes = list(ds.notes) + list(report.notes)
    unseen = {s.label for s in samples} - set(labels)
    if unseen:
        notes.append(f"classes with no training sample were dropped from evaluation: {sorted(unseen)}")
        samples = [s for s in samples if s.label in set(labels)]
    if len(labels) < 2:
        raise ClassforgeError(f"Need at least 2 classes with training samples, found {labels}")
    return Prepared(ds, checked, report, labels, samples, notes)


def train(cfg: TrainConfig) -> Path:
    """Train, save and evaluate one run; returns the run directory."""
    if cfg.strategy not in STRATEGIES + ("auto",):
        raise ClassforgeError(f"--strategy must be one of {', '.join(STRATEGIES)}, not {cfg.strategy!r}")
    from classforge.training.engines import resolve_eval_engine

    resolve_eval_engine(cfg.eval_engine, cfg.extract_engine)  # bad names fail now, not after training
    if cfg.track:
        from classforge.tracking import check_tracker

        check_tracker(cfg.track)  # an unknown tracker or missing package fails now, not after training
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    run = make_run_dir(cfg)
    data = prepare_data(cfg)
    cfg = resolve_for_data(cfg, data)
    cfg.save(run / "config.yaml")
    write_split(run / "split.csv", data.samples)
    if cfg.augment_to:
        add_offline_variants(data, cfg)
    backbone = create_backbone(cfg.backbone, pretrained=cfg.pretrained and cfg.strategy != "scratch",
                               weights=cfg.weights, **backbone_kwargs(cfg, len(data.labels)))
    if cfg.preprocess:
        from classforge.preprocess_ops import attach_ops

        attach_ops(backbone, cfg.preprocess)  # into the InputSpec: model.json, cache key, every preprocessor
    model = Classifier(backbone, len(data.labels), cfg.dropout)
    check_budget(cfg, model)
    check_sam(cfg)  # all before any stage: two-stage would otherwise fail after its embeddings
    check_network_only(cfg)
    check_cutout(cfg, backbone.spec)
    check_mix(cfg, backbone.spec)
    check_progressive(cfg, backbone.spec)
    timing = {"embedding_s": 0.0, "fit_s": 0.0}
    extra: dict = {}
    history: list[dict] = []
    if cfg.strategy in ("linear", "two-stage"):
        history += fit_head_on_embeddings(model, data, cfg, run, timing, extra)
    if cfg.strategy in ("finetune", "two-stage", "scratch"):
        t = time.time()
        history += fit_full(model, data, cfg, run, cfg.strategy, extra)
        timing["fit_s"] += time.time() - t
        if not is_global_zero():
            return run  # DDP workers stop here; rank 0 saves and evaluates
    save_model(run, model, cfg, data.labels)
    write_metrics(run, history)
    from classforge.evaluation.evaluate import evaluate_run

    summary = evaluate_run(run, data, cfg, model, extra_timing=timing, t_start=t0, extra=extra)
    print_summary(run, summary)
    if cfg.track:
        from classforge.tracking import track_run

        track_run(run, cfg.track, cfg.track_uri)
    return run


def check_sam(cfg: TrainConfig) -> None:
    try:
        rho = float(cfg.sam)
    except (TypeError, ValueError):
        raise ClassforgeError(f"--sam is the SAM radius, a number such as 0.05 (0: off); got {cfg.sam!r}") from None
    if not 0 <= rho <= 10 or math.isnan(rho):
        raise ClassforgeError(f"--sam is the SAM radius, between 0 (off) and 10 (0.05 is usual with SGD); got {cfg.sam}")
    cfg.sam = rho
    step = _number(cfg.muon_lr)
    if not 0 < step <= 1:  # also NaN
        raise ClassforgeError(f"--muon-lr is each weight's step as a fraction of its norm, above 0 and at most 1 "
                              f"(0.015 is the default); got {cfg.muon_lr!r}")
    cfg.muon_lr = step


# Options that act while the network itself trains, so --strategy linear (a head on cached embeddings) has none of
# them: (config key, flag, what it does, what to do instead).
NETWORK_ONLY = (
    ("cutout", "--cutout", "augments images while the network trains", "use --views K for augmented embeddings"),
    ("progressive_resize", "--progressive-resize", "changes the images the network trains on",
     "use --strategy scratch or finetune"),
    ("sam", "--sam", "changes how the network's weights are stepped", "use --strategy scratch, finetune or two-stage"),
    ("mixup", "--mixup", "mixes the inputs the network trains on", "use --strategy scratch, finetune or two-stage"),
    ("cutmix", "--cutmix", "mixes the images the network trains on", "use --strategy scratch, finetune or two-stage"),
    ("optimizer", "--optimizer muon", "orthogonalises the network's weight updates",
     "use --strategy scratch, finetune or two-stage"),
)
NETWORK_ONLY_VALUE = {"optimizer": "muon"}  # options that only matter with this value


def check_network_only(cfg: TrainConfig) -> None:
    if cfg.strategy != "linear":
        return
    for key, flag, what, instead in NETWORK_ONLY:
        value = getattr(cfg, key)
        if key in NETWORK_ONLY_VALUE and value != NETWORK_ONLY_VALUE[key]:
            continue
        if value and not (isinstance(value, str) and not value.strip()):
            raise ClassforgeError(f"{flag} {what}; --strategy linear trains a head on cached embeddings: {instead}, "
                                  f"or drop {flag}")


def check_cutout(cfg: TrainConfig, spec) -> None:
    if not cfg.cutout:
        return
    if spec.task != "image":
        raise ClassforgeError("--cutout blanks a square of an image; for audio, masking on the log-mel "
                              "spectrogram is the equivalent (-a spec_augment=true)")
    if not 0 < cfg.cutout < spec.size:
        raise ClassforgeError(f"--cutout is the side of the blanked square in input pixels: between 1 and "
                              f"{spec.size - 1} for this {spec.size}x{spec.size} input, got {cfg.cutout}")


def check_mix(cfg: TrainConfig, spec) -> None:
    """--mixup / --cutmix alphas (Beta(a, a); 0 = off) and --mix-prob; CutMix pastes boxes, so images only."""
    for key, flag in (("mixup", "--mixup"), ("cutmix", "--cutmix")):
        a = _number(getattr(cfg, key))
        if not 0 <= a <= 100:  # also NaN
            raise ClassforgeError(f"{flag} is the alpha of the Beta(alpha, alpha) mixing weight, from 0 (off) to 100 "
                                  f"(0.2-1 is usual); got {getattr(cfg, key)!r}")
        setattr(cfg, key, a)
    p = _number(cfg.mix_prob)
    if not 0 < p <= 1:
        raise ClassforgeError(f"--mix-prob is the share of training batches that are mixed, above 0 and at most 1; "
                              f"got {cfg.mix_prob!r}")
    cfg.mix_prob = p
    if cfg.cutmix and spec.task != "image":
        raise ClassforgeError("--cutmix pastes a box from another image; for audio use --mixup (blends whole clips)")


def _number(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def check_progressive(cfg: TrainConfig, spec) -> None:
    if not cfg.progressive_resize or (isinstance(cfg.progressive_resize, str) and not cfg.progressive_resize.strip()):
        return  # (not a string, e.g. the number 24: parse_progressive below says what it takes)
    if spec.task != "image":
        raise ClassforgeError("--progressive-resize downscales training images; audio inputs have no such option")
    parse_progressive(cfg.progressive_resize, spec.size)  # raises the clear error


DEFAULT_BACKBONE = {"image": "efficientnet_lite0", "audio": "efficientat_mn04"}


def resolve_for_data(cfg: TrainConfig, data: Prepared) -> TrainConfig:
    """Defaults that depend on the data: the backbone for the task, audio clip length, SpecAugment."""
    from classforge.models.registry import backbone_task

    changes: dict = {}
    if cfg.backbone in ("auto", ""):
        changes["backbone"] = DEFAULT_BACKBONE[data.ds.task]
    name = changes.get("backbone", cfg.backbone)
    if cfg.strategy == "auto":
        from classforge.models.registry import registered

        entry = registered().get(name)
        no_weights = entry is not None and entry.weights_desc.startswith("none") and not cfg.weights
        changes["strategy"] = "scratch" if no_weights else "linear"
    if backbone_task(name) != data.ds.task:
        raise ClassforgeError(f"{name} is a {backbone_task(name)} backbone but {data.ds.root} holds {data.ds.task} "
                              f"files; try --backbone {DEFAULT_BACKBONE[data.ds.task]}")
    extra = dict(cfg.extra)
    if data.ds.task == "audio":
        if extra.get("clip_seconds") == "longest":
            longest = max(data.checked.info[s.path].duration_s for s in data.of("train"))
            extra["clip_seconds"] = round(longest, 3)
            data.notes.append(f"--clip-seconds longest: {longest:.2f} s (the longest training recording)")
        args = dict(cfg.backbone_args)
        if changes.get("strategy", cfg.strategy) != "linear" and "spec_augment" not in args and cfg.augment != "none":
            args["spec_augment"] = True  # masking on log-mels while fine-tuning; a no-op at eval time
        if name == "audio_cnn" and "clip_norm" not in args:
            # per-clip normalisation, measured on FSDD with a speaker held out: per-bin ("mel") lifted yweweler
            # (recorded ~15 dB quieter) 0.40 -> 0.82 and george 0.69 -> 0.83 but dropped lucas 0.88 -> 0.74;
            # "level" gave lucas 0.82 and keeps steady spectra (a tone) intact, so it is the default. Written
            # into model.json explicitly, so runs saved before this default keep their own front end.
            args["clip_norm"] = "level"
        if args != dict(cfg.backbone_args):
            changes["backbone_args"] = args
        if changes.get("strategy", cfg.strategy) == "finetune" and name != "audio_cnn":
            # AudioSet -> a new sound task is a larger shift than ImageNet -> photos: the image recipe
            # (8 epochs, lr 1e-3, backbone x0.1) left mn04 under-fitted (FSDD test 0.870 vs 0.927 for the
            # linear head; speaker lucas held out: train accuracy 0.70, test 0.798 -> 0.874 with this recipe).
            unset = {"epochs": cfg.epochs == 0, "lr": cfg.lr == "default",
                     "backbone_lr_mult": cfg.backbone_lr_mult is None}
            changes.update({k: v for k, v in AUDIO_FINETUNE.items() if unset[k]})
    changes["extra"] = extra
    return cfg.replace(**changes)


def add_offline_variants(data: Prepared, cfg: TrainConfig) -> None:
    """--augment-to N: N augmented copies of every *training* recording, written to the cache. Each copy
    inherits its source's label, group and split, so no variant of a val/test recording is ever trained on."""
    if data.ds.task != "audio":
        raise ClassforgeError("--augment-to writes audio variants; for images use --views K or --balance")
    from classforge.data.audio import augment_to_variants, load_audio
    from classforge.data.validate import FileInfo, _sha1

    sr = create_spec_rate(cfg)
    train = data.of("train")
    waves = [(s.path, load_audio(s.path, sr)) for s in progress(train, total=len(train), desc="Decoding sources")]
    level = cfg.augment if cfg.augment in ("light", "strong") else "strong"
    variants = augment_to_variants(waves, cfg.augment_to, sr, level=level,
                                   background_dir=cfg.extra.get("background_dir"), seed=cfg.seed)
    added = []
    for s, paths in zip(train, variants):
        for k, p in enumerate(paths):
            v = Sample(p, f"{s.rel}#variant{k:02d}", s.label, s.group, "train")
            src = data.checked.info[s.path]
            data.checked.info[p] = FileInfo(v.rel, True, sha1=_sha1(p), duration_s=src.duration_s,
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
    from classforge.models.registry import is_budget_aware

    kw = dict(cfg.backbone_args)
    if cfg.extra.get("clip_seconds"):
        kw["clip_seconds"] = cfg.extra["clip_seconds"]
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


def make_run_dir(cfg: TrainConfig) -> Path:
    if cfg.out:
        run = Path(cfg.out)
    else:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        run = Path("runs") / f"{Path(str(cfg.data)).name or 'run'}-{cfg.backbone}-{cfg.strategy}-{stamp}"
    data_root = Path(cfg.data).resolve() if cfg.data else None
    if data_root and (run.resolve() == data_root or data_root in run.resolve().parents):
        raise ClassforgeError(f"--out {run} is inside the data folder; classforge never writes into your data")
    run.mkdir(parents=True, exist_ok=True)
    cfg.save(run / "config.yaml")
    return run


def is_global_zero() -> bool:
    return int(os.environ.get("RANK", os.environ.get("GLOBAL_RANK", "0"))) == 0 and \
        int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0


# ----------------------------------------------------------------------------------------------- strategies
def views_per_class(data: Prepared, cfg: TrainConfig) -> int:
    """--views K, or enough augmented views that the smallest class reaches N (--balance augment-to N)."""
    views = max(1, cfg.views)
    if cfg.balance and cfg.balance.startswith("augment-to"):
        target = int(cfg.balance.split()[-1] if " " in cfg.balance else cfg.balance.split("-")[-1].split("=")[-1])
        counts = np.bincount(data.y("train"), minlength=len(data.labels))
        views = max(views, min(16, math.ceil(target / max(1, counts[counts > 0].min()))))
    return views


def fit_head_on_embeddings(model: Classifier, data: Prepared, cfg: TrainConfig, run: Path, timing: dict,
                           extra: dict) -> list[dict]:
    """Frozen backbone run once per file (cached on disk); the head trains on the cached tensors."""
    from classforge.training.engines import engine_for

    bb = model.backbone
    engine = engine_for(cfg.extract_engine)
    key = emb.backbone_key(cfg.backbone, bb.weights_source, bb.spec.to_dict(), json.dumps(backbone_kwargs(cfg, 0)),
                           engine.key)
    pre = make_preprocessor(bb.spec, augment=cfg.augment if cfg.augment != "none" else "light",
                            max_pixels=cfg.max_pixels, seed=cfg.seed, **audio_kwargs(cfg))
    views = views_per_class(data, cfg)
    t = time.time()
    feats = {}
    extra["embeddings"] = {"cached": 0, "computed": 0, "views": views, "key": key, "engine": engine.key}
    for split in ("train", "val"):
        ss = data.of(split)
        v = views if split == "train" else 1
        sha = [data.checked.info[s.path].sha1 for s in ss]
        feats[split], stats = emb.extract(bb, ss, sha, pre, key, v, cfg.batch_size, desc=f"Embedding {split}",
                                          engine=engine)
        print(f"  {split}: {len(ss)} files, {stats['cached']} embeddings from cache, {stats['computed']} computed")
        for k in ("cached", "computed"):
            extra["embeddings"][k] += stats[k]
    timing["embedding_s"] += time.time() - t
    if engine.note:
        data.notes.append(engine.note)
    ytr = np.repeat(np.array(data.y("train")), feats["train"].shape[1])
    xtr = feats["train"].reshape(-1, feats["train"].shape[-1])
    xva, yva = feats["val"][:, 0], np.array(data.y("val"))
    t = time.time()
    from classforge.training.head import fit_head

    hist = fit_head(model.head, xtr, ytr, xva, yva, cfg, run, class_weights(data, cfg))
    timing["fit_s"] += time.time() - t
    return hist


def audio_kwargs(cfg: TrainConfig) -> dict:
    if cfg.extra.get("background_dir"):
        return {"background_dir": cfg.extra["background_dir"]}
    return {}


def class_weights(data: Prepared, cfg: TrainConfig) -> torch.Tensor | None:
    if cfg.balance not in ("weights", "oversample"):
        return None
    counts = np.bincount(data.y("train"), minlength=len(data.labels)).astype(float)
    w = counts.sum() / (len(counts) * np.maximum(counts, 1))
    return torch.tensor(w, dtype=torch.float32)


def load_raws(samples: list[Sample], pre, desc: str) -> list:
    """Decode every file once into memory (shrunk to the model's size), in parallel."""
    with ThreadPoolExecutor(max_workers=2) as ex:
        return list(progress(ex.map(lambda s: pre.load(s.path), samples), total=len(samples), desc=desc))


def fit_full(model: Classifier, data: Prepared, cfg: TrainConfig, run: Path, stage: str, extra: dict) -> list[dict]:
    from classforge.training.fit import fit_lightning

    return fit_lightning(model, data, cfg, run, stage, extra)


def save_model(run: Path, model: Classifier, cfg: TrainConfig, labels: list[str]) -> None:
    from safetensors.torch import save_file

    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # ONNX files exported from earlier weights (a resumed run) no longer match: predict would pick them up
    for stale in ("model.onnx", "model.int8.onnx", "export.json"):
        (run / stale).unlink(missing_ok=True)
    save_file(sd, str(run / "model.safetensors"))
    meta = {"backbone": cfg.backbone, "backbone_kwargs": backbone_kwargs(cfg, len(labels)),
            "num_classes": len(labels), "dropout": cfg.dropout, "spec": model.backbone.spec.to_dict(),
            "task": model.backbone.spec.task, "weights_source": model.backbone.weights_source,
            "format": "classforge-run/1"}
    (run / "model.json").write_text(json.dumps(meta, indent=2))
    (run / "labels.json").write_text(json.dumps(labels, indent=2))


def write_metrics(run: Path, history: list[dict]) -> None:
    keys = ["stage", "epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_time_s"]
    extra = sorted({k for h in history for k in h} - set(keys))
    with open(run / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys + extra)
        w.writeheader()
        for h in history:
            w.writerow({k: h.get(k, "") for k in keys + extra})


def print_summary(run: Path, s: dict) -> None:
    t = s["test"]
    lo, hi = t["accuracy_ci95"]
    print(f"\nTest accuracy {t['accuracy']:.3f} (95% CI {lo:.3f}-{hi:.3f}, n={t['n']}), macro F1 {t['macro_f1']:.3f}, "
          f"ECE {t['ece']:.3f}; total {s['timing']['total_s']:.1f}s; scored with "
          f"{s.get('evaluation', {}).get('engine', 'torch-fp32')}")
    print(f"Report: {(run / 'report.html').resolve()}")


def environment() -> dict:
    import lightning
    import timm

    return {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "lightning": lightning.__version__, "machine": platform.machine(), "cpus": os.cpu_count()}
