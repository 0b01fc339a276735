"""Fair model comparison: every combination of backbone x strategy x preprocessing trained on one split.

    classforge compare DATA --backbones efficientnet_lite0,cnn --strategies linear,two-stage
    classforge compare RUN_A RUN_B ...          # the same leaderboard from finished runs

The split is made once (OUT/split.csv) and handed to every combination as its `split_file`, so all models
see the same training files and are scored on the same test files. Each combination is an ordinary run
(`training.run.train`) in OUT/runs/<name>; one that fails is listed with its error and the others go on.
The leaderboard (OUT/leaderboard.csv, .md, report.html, accuracy_vs_time.png) puts beside each model's test
accuracy (95% Wilson interval), macro F1 and calibration error what it costs: training time, parameters,
operations per input (from the network's anatomy) and measured CPU latency per input at batch 1. Because
every model is scored on the same files, it also gives an exact McNemar test of each model against the top
one: a large p says the two cannot be told apart on this test set, whatever their accuracies say.

From-scratch backbones (the cnn* family, anything with --no-pretrained) have no pretrained features to
probe, so `linear` or `two-stage` on them would train a head on random features; such requests run as
`scratch` (once, however many strategies asked for it), and the table says so. `--literal-strategies`
runs them as asked (a frozen random CNN is a legitimate, weak baseline).
"""

from __future__ import annotations

import csv
import datetime as dt
import gc
import hashlib
import html
import json
import math
import os
import platform
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from classforge.core.config import STRATEGIES, TrainConfig, load_yaml
from classforge.core.errors import ClassforgeError
from classforge.core.files import open_csv
from classforge.data.ops import ops_label, parse_ops
from classforge.data.split import write_split
from classforge.evaluation.report import _CSS, _img_tag, _table
from classforge.models.anatomy import operations_per_sample
from classforge.models.registry import entry as registry_entry
from classforge.runtime.predictor import Predictor, load_run_model
from classforge.training.prepared import prepare_data
from classforge.training.run import train


@dataclass
class Combo:
    backbone: str
    strategy: str  # what runs
    preprocess: tuple[str, ...] = ()
    requested: list[str] = field(default_factory=list)  # strategies asked for that map onto this one

    @property
    def name(self) -> str:
        pp = ops_label(self.preprocess)
        return f"{self.backbone}-{self.strategy}" + ("" if pp == "none" else f"-{pp}")

    @property
    def note(self) -> str:
        others = [s for s in self.requested if s != self.strategy]
        if not others:
            return ""
        return f"{'/'.join(self.requested)} requested; no pretrained weights, so trained from scratch"


def split_list(s: str | None) -> list[str]:
    return [x.strip() for x in str(s or "").split(",") if x.strip()]


def from_scratch(backbone: str, base: TrainConfig) -> bool:
    """True when the backbone has no pretrained weights to start from in this configuration."""
    if base.weights:
        return False
    if not base.pretrained:
        return True
    e = registry_entry(backbone)
    return bool(e and not e.pretrained)


def plan(backbones: list[str], strategies: list[str], preprocess_options: list[str], base: TrainConfig,
         literal: bool = False) -> list[Combo]:
    if not backbones:
        raise ClassforgeError("--backbones lists no backbone")
    for s in strategies:
        if s not in STRATEGIES:
            raise ClassforgeError(f"--strategies: {s!r} is not one of {', '.join(STRATEGIES)}")
    pps = [parse_ops(p) for p in (preprocess_options or ["none"])]
    combos: dict[str, Combo] = {}
    for b in backbones:
        for s in strategies or ["linear"]:
            run_as = "scratch" if (not literal and from_scratch(b, base)) else s
            for pp in pps:
                c = Combo(b, run_as, pp)
                combos.setdefault(c.name, c).requested.append(s)
    return list(combos.values())


# ------------------------------------------------------------------------------------------- the flow
def compare(data: str, backbones: list[str], strategies: list[str], preprocess_options: list[str] | None = None,
            base: TrainConfig | None = None, out: str | Path | None = None, literal: bool = False,
            latency: bool = True, command: str = "") -> Path:
    """Train every combination on one split and write the leaderboard; returns OUT."""
    base = (base or TrainConfig()).replace(data=str(Path(data).resolve()) if Path(data).exists() else str(data))
    out = Path(out) if out else Path("runs") / f"compare-{Path(str(data)).name}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    combos = plan(backbones, strategies, preprocess_options or [base.preprocess or "none"], base, literal)
    split = make_shared_split(base, out)
    print(f"compare: {len(combos)} combinations on one split ({split}); results in {out}")
    rows = []
    try:
        for i, c in enumerate(combos, 1):
            print(f"\n=== [{i}/{len(combos)}] {c.name}" + (f" ({c.note})" if c.note else ""))
            rows.append(run_combo(c, base.replace(split_file=str(split.resolve())), out / "runs" / c.name, latency))
            gc.collect()
    except KeyboardInterrupt:
        if rows:  # keep what finished; re-running the command into OUT reuses those runs
            write_leaderboard(out, rows, command=command or _command())
        raise
    write_leaderboard(out, rows, command=command or _command())
    return out


SPLIT_KEYS = ("data", "labels_csv", "label_from_name", "bins", "classes", "max_classes", "min_size", "max_pixels",
              "split", "group_by", "test_groups", "seed", "near_dup_distance")


def make_shared_split(base: TrainConfig, out: Path) -> Path:
    """One split.csv for every combination: the given --split-file, or made here from DATA and --seed."""
    dest = out / "split.csv"
    if base.split_file:
        if Path(base.split_file).resolve() != dest.resolve():
            shutil.copyfile(base.split_file, dest)
        return dest
    key = {k: getattr(base, k) for k in SPLIT_KEYS}
    info_file = out / "split_info.json"
    if dest.is_file() and info_file.is_file() and json.loads(info_file.read_text()).get("key") == key:
        return dest  # a re-run into the same OUT keeps its split (and so can reuse finished runs)
    data = prepare_data(base)
    write_split(dest, data.samples)
    info_file.write_text(json.dumps({"method": data.split.method, "counts": data.split.counts, "seed": base.seed,
                                     "notes": data.notes, "key": key}, indent=2))
    return dest


def run_combo(c: Combo, base: TrainConfig, run_dir: Path, latency: bool) -> dict:
    cfg = base.replace(backbone=c.backbone, strategy=c.strategy, preprocess=ops_label(c.preprocess) if c.preprocess
                       else None, out=str(run_dir))
    row = {"name": c.name, "backbone": c.backbone, "strategy": c.strategy, "preprocess": ops_label(c.preprocess),
           "requested": "/".join(c.requested), "note": c.note, "run_dir": str(run_dir)}
    split_file = Path(cfg.split_file or "")
    key = json.dumps({**cfg.to_dict(), "split_sha1": _sha1(split_file)}, sort_keys=True, default=str)
    marker = run_dir / "compare_key.json"
    try:
        if (run_dir / "summary.json").is_file() and marker.is_file() and marker.read_text() == key:
            print(f"  reusing the finished run {run_dir} (same configuration)")
        else:
            if run_dir.exists():
                shutil.rmtree(run_dir)  # a stale or failed attempt: start clean
            train(cfg)
            marker.write_text(key)
    except Exception as e:  # noqa: BLE001 - one failing combination must not stop the comparison
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "error.txt").write_text(traceback.format_exc())
        msg = f"{type(e).__name__}: {e}".strip()
        print(f"  FAILED: {msg.splitlines()[0] if msg else type(e).__name__}")
        return {**row, "status": "failed", "error": msg.splitlines()[0][:500] if msg else type(e).__name__}
    return {**row, **row_from_run(run_dir, latency)}


# ----------------------------------------------------------------------------------------- measurements
def row_from_run(run: Path, latency: bool = True) -> dict:
    """The leaderboard figures of one finished run (summary.json + measured cost)."""
    s = json.loads((run / "summary.json").read_text())
    cfg = _config(run)
    meta = json.loads((run / "model.json").read_text()) if (run / "model.json").is_file() else {}
    t, v, timing = s["test"], s.get("val") or {}, s.get("timing", {})
    emb = s.get("embeddings") or {}
    row = {
        "status": "ok", "backbone": s["backbone"], "strategy": s["strategy"],
        "preprocess": ops_label(tuple((meta.get("spec") or {}).get("preprocess") or ())),
        "test_accuracy": t["accuracy"], "ci95_lo": t["accuracy_ci95"][0], "ci95_hi": t["accuracy_ci95"][1],
        "test_n": t["n"], "macro_f1": t["macro_f1"], "ece": t["ece"], "val_accuracy": v.get("accuracy"),
        "train_time_s": round(float(timing.get("embedding_s", 0)) + float(timing.get("fit_s", 0)), 2),
        "total_time_s": round(float(timing.get("total_s", 0)), 2),
        "embeddings_cached": int(emb.get("cached", 0)), "embeddings_computed": int(emb.get("computed", 0)),
        "params": s["params"]["total"], "trainable_params": s["params"]["trainable"],
        "weights": meta.get("weights_source", ""), "input": _input_desc(meta.get("spec") or {}),
        "epochs_run": _epochs(run / "metrics.csv"), "stopped_by": (s.get("trainer") or {}).get("stopped_by"),
        "seed": cfg.get("seed", (s.get("split") or {}).get("seed")), "split_sha1": _sha1(run / "split.csv"),
        "run_dir": str(run),
    }
    if latency:
        try:
            row.update(measure_cost(run))
        except Exception as e:  # noqa: BLE001 - a figure we cannot measure is left blank, with the reason
            row["cost_error"] = f"{type(e).__name__}: {e}"[:300]
    return row


def measure_cost(run: Path, reps: int = 20) -> dict:
    """Operations per input (anatomy) and measured CPU latency per input at batch 1 (median of `reps`
    forwards after warm-up, through the run's Predictor: the path `predict` and the server use), plus
    the median time to decode and preprocess one test file (where --preprocess ops cost shows)."""
    import torch

    model, meta, _ = load_run_model(run)
    spec = meta["spec"]
    shape = (round(spec["sample_rate"] * spec["clip_seconds"]),) if spec["task"] == "audio" else \
        (spec["channels"], spec["size"], spec["size"])
    totals = operations_per_sample(model, shape)
    p = Predictor.from_run(run, backend="torch")
    files = _test_files(run)[:5]
    pre_ms = []
    if files:
        xs = []
        for f in files * 2:
            t0 = time.perf_counter()
            xs.append(p.preprocess(f))
            pre_ms.append((time.perf_counter() - t0) * 1000)
        x = xs[0][None]
    else:
        x = torch.randn(1, *shape)
    # One thread: batch-1 latency is what a single request costs, and on a machine whose cores are busy a
    # multi-threaded forward waits for its slowest thread (measured here: 0.7 ms for a small CNN on 1 thread,
    # 198 ms median on 2 threads under load).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(3):
            p.forward(x)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            p.forward(x)
            times.append((time.perf_counter() - t0) * 1000)
    finally:
        torch.set_num_threads(threads)
    return {"macs": int(totals["macs"]), "ops": int(totals["ops"]), "latency_ms": round(float(np.median(times)), 3),
            "latency_min_ms": round(float(np.min(times)), 3), "load_avg_1m": round(os.getloadavg()[0], 2),
            "preprocess_ms": round(float(np.median(pre_ms)), 3) if pre_ms else None,
            "torch_threads": 1}


def _test_files(run: Path) -> list[str]:
    root = Path(_config(run).get("data") or "")
    out = []
    if (run / "split.csv").is_file():
        with open_csv(run / "split.csv") as f:
            for r in csv.DictReader(f):
                if r["split"] == "test" and (root / r["path"]).is_file():
                    out.append(str(root / r["path"]))
    return out


def _epochs(path: Path) -> str:
    """Epochs trained per stage, from metrics.csv: "head 23" or "head 60, two-stage 6"."""
    per: dict[str, int] = {}
    if path.is_file():
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                if r.get("epoch") not in (None, "", "0") and r.get("train_loss") not in (None, ""):
                    per[r.get("stage", "")] = per.get(r.get("stage", ""), 0) + 1
    return ", ".join(f"{k} {v}" for k, v in per.items())


def _config(run: Path) -> dict:
    p = run / "config.yaml"
    return (load_yaml(p.read_text()) or {}) if p.is_file() else {}


def _input_desc(spec: dict) -> str:
    if not spec:
        return ""
    if spec.get("task") == "audio":
        return f"{spec.get('clip_seconds')} s @ {spec.get('sample_rate')} Hz"
    return f"{spec.get('channels', 3)}x{spec.get('size')}x{spec.get('size')}"


def _sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()[:12] if path.is_file() else ""


def mcnemar_p(run_a: Path, run_b: Path) -> float | None:
    """Exact two-sided McNemar test on the test files both runs scored: are their error rates different?"""
    from scipy.stats import binomtest

    a, b = _correct(run_a), _correct(run_b)
    common = set(a) & set(b)
    if not common:
        return None
    only_a = sum(1 for k in common if a[k] and not b[k])
    only_b = sum(1 for k in common if b[k] and not a[k])
    if only_a + only_b == 0:
        return 1.0
    return float(binomtest(only_a, only_a + only_b, 0.5).pvalue)


def _correct(run: Path) -> dict[str, bool]:
    p = Path(run) / "predictions.csv"
    if not p.is_file():
        return {}
    with open_csv(p) as f:
        return {r["path"]: r["correct"] == "1" for r in csv.DictReader(f)}


# ----------------------------------------------------------------------------------------- from finished runs
def compare_runs(run_dirs: list[str | Path], out: str | Path | None = None, latency: bool = True,
                 command: str = "") -> Path:
    runs = [Path(r) for r in run_dirs]
    for r in runs:
        if not (r / "summary.json").is_file():
            raise ClassforgeError(f"{r} is not a finished run (no summary.json)")
    out = Path(out) if out else Path("runs") / f"compare-{dt.datetime.now():%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for r in runs:
        row = {"name": r.name, "note": "", "requested": ""}
        try:
            row.update(row_from_run(r, latency))
        except Exception as e:  # noqa: BLE001
            row.update({"status": "failed", "error": f"{type(e).__name__}: {e}"[:500], "run_dir": str(r)})
        rows.append(row)
    write_leaderboard(out, rows, command=command or _command())
    return out


# ----------------------------------------------------------------------------------------- the leaderboard
COLUMNS = ["rank", "name", "backbone", "strategy", "preprocess", "status", "test_accuracy", "ci95_lo", "ci95_hi",
           "test_n", "macro_f1", "ece", "val_accuracy", "train_time_s", "total_time_s", "embeddings_cached",
           "embeddings_computed", "params", "trainable_params", "macs", "ops", "latency_ms", "latency_min_ms",
           "load_avg_1m", "preprocess_ms",
           "mcnemar_p_vs_best", "weights", "input", "epochs_run", "stopped_by", "seed", "split_sha1", "requested",
           "note", "error", "cost_error", "run_dir"]


def rank_rows(rows: list[dict]) -> list[dict]:
    ok = sorted([r for r in rows if r.get("status") == "ok"],
                key=lambda r: (-r["test_accuracy"], -r["macro_f1"], r["train_time_s"]))
    failed = [r for r in rows if r.get("status") != "ok"]
    for i, r in enumerate(ok, 1):
        r["rank"] = i
        r["mcnemar_p_vs_best"] = None if i == 1 else mcnemar_p(Path(ok[0]["run_dir"]), Path(r["run_dir"]))
    for r in failed:
        r["rank"] = ""
    return ok + failed


def data_card(rows: list[dict], command: str) -> dict:
    """What is needed to reproduce the table: data, split, seed, samples per class, versions, machine."""
    ok = [r for r in rows if r.get("status") == "ok"]
    card: dict = {"created": dt.datetime.now().isoformat(timespec="seconds"), "command": command,
                  "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                              "cpus": os.cpu_count()},
                  "software": _versions()}
    if not ok:
        return card
    s = json.loads((Path(ok[0]["run_dir"]) / "summary.json").read_text())
    split = s.get("split") or {}
    shas = sorted({r["split_sha1"] for r in ok})
    card.update({
        "data": s.get("data", ""), "task": s.get("task", ""), "classes": s.get("classes"),
        "split_method": split.get("method", ""), "split_counts": split.get("counts", {}),
        "seeds": sorted({r.get("seed") for r in ok if r.get("seed") is not None}),
        "split_sha1": shas, "same_split": len(shas) == 1,
        "samples_per_class": _per_class_counts(Path(ok[0]["run_dir"]) / "split.csv"),
        "run_environment": s.get("environment", {}),
        "torch_threads": sorted({r.get("torch_threads") for r in ok if r.get("torch_threads")}),
        "load_avg_1m": sorted({r.get("load_avg_1m") for r in ok if r.get("load_avg_1m") is not None}),
    })
    shared = Path(ok[0]["run_dir"]).parent.parent / "split_info.json"  # written by compare() when it made the split
    if shared.is_file():
        info = json.loads(shared.read_text())
        card["split_method"] = f"{info['method']} (made once, shared by every run)"
        card["split_counts"] = info["counts"]
    return card


def _per_class_counts(split_csv: Path) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    if split_csv.is_file():
        with open_csv(split_csv) as f:
            for r in csv.DictReader(f):
                c = counts.setdefault(r["label"], {"train": 0, "val": 0, "test": 0})
                c[r["split"]] = c.get(r["split"], 0) + 1
    return counts


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("classforge", "torch", "torchvision", "timm", "lightning", "numpy", "pillow", "scikit-learn",
                "onnxruntime", "opencv-python-headless", "optuna", "mlflow"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _command() -> str:
    return " ".join(["classforge"] + sys.argv[1:]) if Path(sys.argv[0]).name == "classforge" else " ".join(sys.argv)


def write_leaderboard(out: Path, rows: list[dict], command: str = "") -> list[dict]:
    rows = rank_rows(rows)
    card = data_card(rows, command)
    with open(out / "leaderboard.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS})
    plot_accuracy_vs_time(out / "accuracy_vs_time.png", rows)
    (out / "leaderboard.md").write_text(markdown(rows, card))
    (out / "compare.json").write_text(json.dumps({"rows": rows, "card": card}, indent=2, default=str))
    (out / "report.html").write_text(html_page(out, rows, card))
    print_table(rows)
    print(f"\nLeaderboard: {(out / 'leaderboard.md').resolve()}\nReport: {(out / 'report.html').resolve()}")
    return rows


def _fmt_int(n) -> str:
    if n in (None, ""):
        return ""
    n = float(n)
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return f"{int(n)}"


def _fmt(v, spec: str) -> str:
    return "" if v in (None, "") or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def table_rows(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    headers = ["#", "model", "strategy", "preprocess", "test acc [95% CI]", "macro F1", "ECE", "train time",
               "params", "MACs / input", "CPU ms / input (median/min)", "preproc ms", "McNemar p vs #1", "notes"]
    out = []
    for r in rows:
        if r.get("status") != "ok":
            out.append(["", r["name"], r.get("strategy", ""), r.get("preprocess", ""), "failed", "", "", "", "", "",
                        "", "", "", r.get("error", "")])
            continue
        notes = [r.get("note") or ""]
        if r.get("embeddings_cached"):
            notes.append(f"{r['embeddings_cached']} of {r['embeddings_cached'] + r['embeddings_computed']} "
                         "embeddings from cache (time excludes them)")
        if r.get("cost_error"):
            notes.append(f"cost not measured: {r['cost_error']}")
        out.append([str(r["rank"]), r["backbone"], r["strategy"], r["preprocess"],
                    f"{r['test_accuracy']:.3f} [{r['ci95_lo']:.3f}, {r['ci95_hi']:.3f}]", f"{r['macro_f1']:.3f}",
                    f"{r['ece']:.3f}", f"{r['train_time_s']:.1f} s", _fmt_int(r["params"]), _fmt_int(r.get("macs")),
                    _latency(r), _fmt(r.get("preprocess_ms"), ".1f"),
                    _p(r.get("mcnemar_p_vs_best")), "; ".join(n for n in notes if n)])
    return headers, out


def _p(p) -> str:
    return "" if p in (None, "") else ("<0.001" if float(p) < 0.001 else f"{float(p):.3f}")


def _latency(r: dict) -> str:
    if r.get("latency_ms") is None:
        return ""
    return f"{r['latency_ms']:.1f} / {r['latency_min_ms']:.1f}" if r.get("latency_min_ms") is not None else \
        f"{r['latency_ms']:.1f}"


def _md_escape(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def markdown(rows: list[dict], card: dict) -> str:
    headers, body = table_rows(rows)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_md_escape(c) for c in r) + " |" for r in body]
    return "\n".join(lines) + "\n\n" + card_markdown(card, rows)


def card_markdown(card: dict, rows: list[dict]) -> str:
    lines = ["**Data and model card**", ""]
    if card.get("data"):
        lines += [f"- data: `{card['data']}` ({card.get('task')}, {card.get('classes')} classes)",
                  f"- split: {card['split_method']}; sizes {json.dumps(card['split_counts'])}; split.csv sha1 "
                  f"{', '.join(card['split_sha1'])}" + ("" if card["same_split"] else
                                                       " — WARNING: the runs do not share one split"),
                  f"- seed: {', '.join(str(s) for s in card['seeds'])}",
                  "- samples per class (train/val/test): " + ", ".join(
                      f"{c} {v.get('train', 0)}/{v.get('val', 0)}/{v.get('test', 0)}"
                      for c, v in card["samples_per_class"].items())]
    lines += ["- software: " + ", ".join(f"{k} {v}" for k, v in card["software"].items()),
              f"- machine: {card['machine']['platform']}, {card['machine']['cpus']} CPUs"
              + (f", latency measured on {card['torch_threads'][0]} torch thread" if card.get("torch_threads") else "")
              + (f", 1-min load average while measuring latency {card['load_avg_1m']}" if card.get("load_avg_1m") else ""),
              "- models: " + "; ".join(f"{r['name']}: weights {r.get('weights') or '?'}, input {r.get('input', '')}, "
                                       f"epochs {r.get('epochs_run') or '-'}"
                                       + (f" ({r['stopped_by']})" if r.get("stopped_by") else "")
                                       for r in rows if r.get("status") == "ok")]
    if card.get("command"):
        lines.append(f"- command: `{card['command']}`")
    lines += ["", ("Test accuracy with its 95% Wilson interval; ECE = expected calibration error (15 bins); train "
                   "time = embedding + fitting wall time; MACs/input from the network anatomy; CPU ms/input = median / "
                   "fastest of 20 single-thread forwards at batch 1 through the run's Predictor (on a shared machine "
                   "the fastest is the steadier figure); preproc ms = decoding + preprocessing one test file; McNemar p = exact test "
                   "of each model against #1 on the same test files (large p: not distinguishable on this test set).")]
    return "\n".join(lines) + "\n"


def plot_accuracy_vs_time(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok"]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for r in ok:
        x = max(r["train_time_s"], 0.01)
        y = r["test_accuracy"]
        cached = bool(r.get("embeddings_cached"))  # its time leaves out embeddings read from the cache
        ax.errorbar([x], [y], yerr=[[y - r["ci95_lo"]], [r["ci95_hi"] - y]], fmt="o", capsize=3,
                    mfc="white" if cached else None)
        ax.annotate(r["name"] + (" (cached emb.)" if cached else ""), (x, y), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)
    ax.margins(x=0.25)
    ax.set_xscale("log")
    ax.set_xlabel("training time (s, log scale)")
    ax.set_ylabel("test accuracy (95% CI)")
    ax.set_title("Accuracy against training time")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")  # labels of the slowest models may reach past the axes
    plt.close(fig)


def leaderboard_section(out: Path, rows: list[dict], card: dict) -> str:
    """The leaderboard as an HTML section (for a comparison's report.html or any other report)."""
    headers, body = table_rows(rows)
    for r, b in zip(rows, body):
        rep = Path(r.get("run_dir", "")) / "report.html"
        if rep.is_file():
            b[1] = f"{b[1]} ({os.path.relpath(rep, out)})"
    card_html = "<br>".join(html.escape(line.lstrip("- ")) for line in card_markdown(card, rows).splitlines()[2:]
                            if line.strip())
    return (f"<h2>Leaderboard</h2>{_table(headers, body, left=4)}"
            f"<h3>Accuracy against training time</h3>{_img_tag(out / 'accuracy_vs_time.png', 700)}"
            f"<h3>Data and model card</h3><p>{card_html}</p>")


def html_page(out: Path, rows: list[dict], card: dict) -> str:
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>classforge compare</title>'
            f"<style>{_CSS}</style></head><body><h1>classforge compare</h1>"
            f'<p class="sub">{html.escape(str(card.get("data", "")))} · {len(rows)} models · '
            f"{html.escape(card['created'])}</p>{leaderboard_section(out, rows, card)}"
            f'<p class="sub">Files: leaderboard.csv, leaderboard.md, compare.json, split.csv, runs/.</p></body></html>')


def print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    headers, body = table_rows(rows)
    t = Table(title="classforge compare")
    for h in headers[:-1]:
        t.add_column(h)
    for b in body:
        t.add_row(*b[:-1])
    console = Console(width=200)
    console.print(t)
    for r in rows:
        if r.get("status") != "ok":
            console.print(f"[red]{r['name']} failed:[/] {r.get('error', '')}", markup=True, highlight=False)


# ----------------------------------------------------------------------------------------- CLI


def _raise(msg: str):
    raise ClassforgeError(msg)
