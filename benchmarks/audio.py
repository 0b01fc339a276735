"""Audio benchmarks on ../shared/datasets: FSDD strategies, FSDD speakers held out, Pokémon cries.

  python benchmarks/audio.py fsdd       [--strategies linear,finetune,two-stage,scratch] [--augment light]
  python benchmarks/audio.py speakers   [--strategy scratch] [--augment strong] [--speakers all]
  python benchmarks/audio.py cries      [--augment-to 0,25] [--strategy linear] [--preprocess lowpass=5000]

Every run is an ordinary classforge run directory under --out; a JSON line per run is printed and appended to
--results (default benchmarks/results/audio_results.jsonl). Needs the mn04 AudioSet weights (CLASSFORGE_MN04_WEIGHTS or
../shared/weights/mn04_as_mAP_432.pt).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
os.environ.setdefault("CLASSFORGE_QUIET", "1")
if "CLASSFORGE_MN04_WEIGHTS" not in os.environ and (SHARED / "weights" / "mn04_as_mAP_432.pt").exists():
    os.environ["CLASSFORGE_MN04_WEIGHTS"] = str(SHARED / "weights" / "mn04_as_mAP_432.pt")

import classforge  # noqa: E402


def record(results: Path, name: str, run: Path, write: bool = True, **info) -> dict:
    s = json.loads((run / "summary.json").read_text())
    n_emb = s.get("embeddings", {}).get("computed", 0)
    row = {"bench": name, **info, "test_acc": round(s["test"]["accuracy"], 4), "test_n": s["test"]["n"],
           "ci95": [round(x, 3) for x in s["test"]["accuracy_ci95"]], "macro_f1": round(s["test"]["macro_f1"], 4),
           "total_s": round(s["timing"]["total_s"], 1), "embedding_s": round(s["timing"].get("embedding_s", 0), 1),
           "clips_per_s_embedding": round(n_emb / s["timing"]["embedding_s"], 1) if n_emb and s["timing"].get("embedding_s") else None,
           "fit_s": round(s["timing"].get("fit_s", 0), 1), "run": str(run), "date": time.strftime("%Y-%m-%d %H:%M")}
    print(json.dumps(row), flush=True)
    if write:  # a reused run was recorded when it was trained
        with open(results, "a") as f:
            f.write(json.dumps(row) + "\n")
    return row


def common(a) -> dict:
    kw = {"seed": a.seed}
    if a.threads:
        kw["threads"] = a.threads
    if a.preprocess:
        kw["preprocess"] = a.preprocess
    if a.epochs:
        kw["epochs"] = a.epochs
    from classforge.core.config import load_yaml

    for item in a.set:
        k, _, v = item.partition("=")
        kw[k.replace("-", "_")] = load_yaml(v)
    if a.backbone_args:
        kw["backbone_args"] = {k: load_yaml(v) for k, v in (x.split("=", 1) for x in a.backbone_args.split(","))}
    return kw


def tag(a) -> str:
    return "".join(f"-{x}" for x in (a.backbone_args, a.preprocess, *a.set) if x).replace("=", "").replace(",", "-")


def fsdd(a):
    data = SHARED / "datasets" / "fsdd"
    for st in a.strategies.split(","):
        bb = "audio_cnn" if st == "scratch" else (a.backbone or "efficientat_mn04")
        run = classforge.train(data, Path(a.out) / f"fsdd-{st}-{bb}", strategy=st, backbone=bb, augment=a.augment,
                               **common(a))
        record(Path(a.results), "fsdd-official", run, strategy=st, backbone=bb, augment=a.augment,
               preprocess=a.preprocess, options=a.set, epochs=a.epochs or None)


def speakers(a):
    data = SHARED / "datasets" / "fsdd"
    names = sorted({re.match(r"\d+_([a-z]+)_", p.name).group(1) for p in (data / "train").rglob("*.wav")})
    chosen = names if a.speakers == "all" else a.speakers.split(",")
    rows = []
    bb = a.backbone or ("audio_cnn" if a.strategy == "scratch" else "efficientat_mn04")
    for spk in chosen:
        run = Path(a.out) / f"fsdd-speaker-{spk}-{a.strategy}-{bb}-{a.augment}{tag(a)}"
        reused = a.reuse and (run / "summary.json").exists()
        if reused:
            print(f"reusing {run}", flush=True)
        else:
            run = classforge.train(data, run, strategy=a.strategy, backbone=bb, resplit=True,
                                   group_by=r"^[^/]+/\d+/\d+_([a-z]+)_", test_groups=spk, augment=a.augment,
                                   augment_to=a.speaker_augment_to, **common(a))
        rows.append(record(Path(a.results), "fsdd-speaker-held-out", run, write=not reused, speaker=spk, strategy=a.strategy,
                           backbone=bb, augment=a.augment, augment_to=a.speaker_augment_to,
                           backbone_args=a.backbone_args, preprocess=a.preprocess, options=a.set))
    mean = sum(r["test_acc"] for r in rows) / len(rows)
    row = {"bench": "fsdd-speaker-held-out-mean", "strategy": a.strategy, "backbone": bb, "augment": a.augment,
           "augment_to": a.speaker_augment_to, "backbone_args": a.backbone_args, "preprocess": a.preprocess,
           "options": a.set, "mean_acc": round(mean, 4),
           "per_speaker": {r["speaker"]: r["test_acc"] for r in rows}, "date": time.strftime("%Y-%m-%d %H:%M")}
    print(json.dumps(row))
    if len(chosen) > 1:
        with open(a.results, "a") as f:
            f.write(json.dumps(row) + "\n")


def cries(a):
    root = SHARED / "datasets" / "pokemon_gen1_cries"
    labels = Path(a.out) / "cries_labels.csv"
    labels.parent.mkdir(parents=True, exist_ok=True)
    with open(labels, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "group", "split"])
        for d in sorted(p for p in root.iterdir() if p.is_dir()):
            w.writerow([f"{d.name}/latest.ogg", d.name, d.name, "train"])
            w.writerow([f"{d.name}/legacy.ogg", d.name, d.name, "test"])
    for n in [int(x) for x in a.augment_to.split(",")]:
        bb = a.backbone or "efficientat_mn04"
        tag = f"cries-aug{n}-{a.strategy}-{bb}" + (f"-{a.preprocess}" if a.preprocess else "") + \
            ("" if a.cries_augment == "strong" else f"-online-{a.cries_augment}") + \
            (f"-ep{a.epochs}" if a.epochs else "")
        run = classforge.train(root, Path(a.out) / tag, labels_csv=str(labels), backbone=bb,
                               strategy=a.strategy, augment_to=n, augment=a.cries_augment,
                               extra={"clip_seconds": a.clip_seconds} if a.clip_seconds else {}, **common(a))
        record(Path(a.results), "cries-latest-to-legacy", run, augment_to=n, strategy=a.strategy, backbone=bb,
               preprocess=a.preprocess, online_augment=a.cries_augment, epochs=a.epochs or None,
               chance=round(1 / 151, 4))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bench", choices=["fsdd", "speakers", "cries"])
    ap.add_argument("--out", default="/tmp/classforge-audio-bench")
    ap.add_argument("--results", default=str(Path(__file__).parent / "results" / "audio_results.jsonl"))
    ap.add_argument("--strategies", default="linear,finetune,two-stage,scratch")
    ap.add_argument("--strategy", default="linear")
    ap.add_argument("--speakers", default="all")
    ap.add_argument("--augment", default="light")
    ap.add_argument("--augment-to", default="0,25")
    ap.add_argument("--cries-augment", default="strong", help="cries: online augmentation while training")
    ap.add_argument("--clip-seconds", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backbone", default=None, help="default: efficientat_mn04 (audio_cnn for scratch)")
    ap.add_argument("--preprocess", default=None, help="audio ops for every file, e.g. lowpass=5000")
    ap.add_argument("--speaker-augment-to", type=int, default=0, help="speakers: offline variants per recording")
    ap.add_argument("--epochs", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="any training option, repeatable, e.g. --set lr=3e-3 --set backbone_lr_mult=0.3")
    ap.add_argument("--reuse", action="store_true",
                    help="speakers: score an existing run directory (summary.json present) instead of retraining")
    ap.add_argument("--backbone-args", default=None, help="backbone options as k=v,k=v (like -a), e.g. clip_norm=true")
    a = ap.parse_args()
    if not (SHARED / "datasets").exists():
        raise SystemExit(f"{SHARED / 'datasets'} not found")
    {"fsdd": fsdd, "speakers": speakers, "cries": cries}[a.bench](a)


if __name__ == "__main__":
    main()
