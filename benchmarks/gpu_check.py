"""GPU throughput beside the CPU's, from ordinary `classforge train` runs (benchmarks/gpu_check.sh runs this after
the gpu tests):

- extraction: a linear run's embeddings.files_per_s (decode included, fresh cache) on the GPU and on the CPU;
- fine-tuning: EfficientNet-Lite0 training images/s (metrics.csv, the last epoch) on each;
- the CIFAR-10 recipe (`--backbone cnn --max-params 256000`): seconds per epoch, and test accuracy after a
  --cifar-budget on the GPU (CPU: a shorter run, for its epoch time).

    python benchmarks/gpu_check.py --data ../shared/datasets/hymenoptera --cifar10 ../shared/datasets/cifar10

Without --data the check uses the digits that ship with scikit-learn (`classforge demo`'s data); without a CIFAR-10
folder that row says so. --device cpu runs every row on the CPU alone (a dry run of the script on any machine)."""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def train(data: str, out: Path, cache: Path, *options: str) -> dict:
    env = {**os.environ, "CLASSFORGE_CACHE": str(cache), "CLASSFORGE_QUIET": "1"}
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "classforge.cli", "train", data, "--out", str(out), *options],
                          capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"classforge train {data} {' '.join(options)} failed:\n{proc.stdout[-2000:]}\n"
                         f"{proc.stderr[-2000:]}")
    s = json.loads((out / "summary.json").read_text())
    s["wall_s"] = round(time.perf_counter() - t, 1)
    with open(out / "metrics.csv") as f:
        s["epochs"] = [r for r in csv.DictReader(f) if r.get("train_time_s")]
    return s


def accelerator(device: str) -> str:
    return "gpu" if device == "cuda" else "cpu"


def extraction(data: str, device: str, tmp: Path) -> dict:
    s = train(data, tmp / f"lin-{device}", tmp / f"cache-{device}", "--strategy", "linear", "--accelerator",
              accelerator(device))
    e = s["embeddings"]
    return {"files_per_s": e.get("files_per_s"), "files": e["computed"], "engine": e["engine"]}


def finetune(data: str, device: str, tmp: Path) -> dict:
    s = train(data, tmp / f"ft-{device}", tmp / f"cache-{device}", "--strategy", "finetune", "--epochs", "2",
              "--accelerator", accelerator(device))
    last = s["epochs"][-1]
    return {"images_per_s": float(last["images_per_s"]), "precision": s["trainer"]["precision"],
            "test_accuracy": round(s["test"]["accuracy"], 4)}


def cifar(path: str, device: str, budget: str, tmp: Path) -> dict:
    s = train(path, tmp / f"cifar-{device}", tmp / f"cache-{device}", "--backbone", "cnn", "--max-params", "256000",
              "--time-budget", budget, "--accelerator", accelerator(device))
    epochs = [float(r["train_time_s"]) for r in s["epochs"]]
    return {"epoch_s": round(sorted(epochs)[len(epochs) // 2], 1) if epochs else None, "epochs": len(epochs),
            "budget": budget, "test_accuracy": round(s["test"]["accuracy"], 4),
            "precision": s["trainer"]["precision"]}


def default_data(tmp: Path) -> str:
    hym = SHARED / "hymenoptera"
    if hym.is_dir():
        return str(hym)
    from classforge.demo import write_digits

    return str(write_digits(tmp / "digits"))


def machine() -> dict:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"gpu": gpu, "cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def table(rows: dict) -> str:
    lines = ["| figure | GPU | CPU |", "|---|---:|---:|"]
    for name, (gpu, cpu) in rows.items():
        lines.append(f"| {name} | {gpu} | {cpu} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="an image folder (default: ../shared hymenoptera, else scikit-learn's digits)")
    ap.add_argument("--cifar10", default=str(SHARED / "cifar10"), help="CIFAR-10 folder with train/ and test/")
    ap.add_argument("--cifar-budget", default="2m")
    ap.add_argument("--cpu-cifar-budget", default="90s", help="the CPU run, for its epoch time")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a dry run on the CPU alone")
    ap.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        data = args.data or default_data(tmp)
        figures: dict = {"machine": machine(), "data": data}
        for device in dict.fromkeys((args.device, "cpu")):
            figures[device] = {"extraction": extraction(data, device, tmp), "finetune": finetune(data, device, tmp)}
            if Path(args.cifar10, "train").is_dir():
                budget = args.cifar_budget if device == "cuda" else args.cpu_cifar_budget
                figures[device]["cifar10"] = cifar(args.cifar10, device, budget, tmp)
            print(f"{device}: {json.dumps(figures[device])}", flush=True)
    g, c = figures.get("cuda", {}), figures["cpu"]

    def pick(d: dict, *keys):
        for k in keys:
            d = d.get(k, {}) if isinstance(d, dict) else {}
        return d if d != {} else "not run"

    print(f"\n{figures['machine']}\n")
    print(table({
        "extraction, files/s (decode included)": (pick(g, "extraction", "files_per_s"),
                                                   pick(c, "extraction", "files_per_s")),
        "fine-tune Lite0, training images/s": (pick(g, "finetune", "images_per_s"), pick(c, "finetune", "images_per_s")),
        "CIFAR-10 recipe, s per epoch": (pick(g, "cifar10", "epoch_s"), pick(c, "cifar10", "epoch_s")),
        f"CIFAR-10 recipe, test accuracy after {args.cifar_budget} (GPU) / {args.cpu_cifar_budget} (CPU)":
            (pick(g, "cifar10", "test_accuracy"), pick(c, "cifar10", "test_accuracy")),
    }))
    if not Path(args.cifar10, "train").is_dir():
        print(f"\nCIFAR-10 rows not run: no {args.cifar10}/train (give --cifar10 PATH)")
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
