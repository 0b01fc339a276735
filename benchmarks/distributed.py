"""Embedding extraction in 1 and N processes (`classforge train DATA --devices N`), same data, fresh cache each run:
files/s of each process and of the run, scaling efficiency, and whether the runs agree (test accuracy, split).

    python benchmarks/distributed.py ../shared/datasets/hymenoptera --processes 1,2 --repeats 2

Scaling efficiency = (run files/s with N processes) / (N x run files/s with 1 process x cores share), where the
share corrects for processes that split the same cores: on one machine N processes get the cores one process had,
so the ideal is the one-process figure (efficiency 1.0 = no loss to the extra processes); on N machines or N GPUs
each process brings its own (pass --own-cores)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def one(data: str, n: int, tmp: Path, accelerator: str) -> dict:
    out, cache = tmp / f"run-{n}-{time.time_ns()}", tmp / f"cache-{time.time_ns()}"
    env = {**os.environ, "CLASSFORGE_CACHE": str(cache), "CLASSFORGE_QUIET": "1"}
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "classforge.cli", "train", data, "--out", str(out), "--strategy",
                           "linear", "--accelerator", accelerator, "--devices", str(n)],
                          capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"train --devices {n} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    s = json.loads((out / "summary.json").read_text())
    e = s["embeddings"]
    per = e.get("per_process") or [{"rank": 0, "computed": e["computed"], "loop_s": e.get("loop_s", 0),
                                    "files_per_s": e.get("files_per_s")}]
    # the run's extraction rate: all files over the slowest process's time
    slowest = max(p["loop_s"] for p in per)
    return {"processes": n, "world_size": e["world_size"], "wall_s": round(wall, 1),
            "embedding_s": round(s["timing"]["embedding_s"], 1), "files": e["computed"],
            "run_files_per_s": round(e["computed"] / slowest, 1) if slowest else None,
            "per_process_files_per_s": [p["files_per_s"] for p in per],
            "test_accuracy": round(s["test"]["accuracy"], 4), "split": (out / "split.csv").read_text()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data")
    ap.add_argument("--processes", default="1,2")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--accelerator", default="cpu")
    ap.add_argument("--own-cores", action="store_true", help="each process has its own cores or GPU")
    ap.add_argument("--out", type=Path, help="append the rows here as JSON lines")
    args = ap.parse_args()
    counts = [int(n) for n in args.processes.split(",")]
    rows: dict[int, list[dict]] = {n: [] for n in counts}
    with tempfile.TemporaryDirectory() as t:
        for _ in range(args.repeats):  # alternating, so a slow minute does not land on one setting alone
            for n in counts:
                r = one(args.data, n, Path(t), args.accelerator)
                rows[n].append(r)
                print(json.dumps({k: v for k, v in r.items() if k != "split"}), flush=True)
    base = statistics.median(r["run_files_per_s"] for r in rows[counts[0]])
    print("\n| processes | run files/s (median) | per-process files/s | scaling efficiency | test accuracy | wall s |")
    print("|---:|---:|---|---:|---:|---:|")
    for n in counts:
        rate = statistics.median(r["run_files_per_s"] for r in rows[n])
        ideal = base * (n / counts[0] if args.own_cores else 1)
        per = ", ".join(f"{v:.1f}" for r in rows[n] for v in r["per_process_files_per_s"] if v)
        accs = sorted({r["test_accuracy"] for r in rows[n]})
        print(f"| {n} | {rate:.1f} | {per} | {rate / ideal:.2f} | {', '.join(map(str, accs))} | "
              f"{statistics.median(r['wall_s'] for r in rows[n]):.1f} |")
    splits = {r["split"] for rs in rows.values() for r in rs}
    print(f"\nsplits identical across every run: {len(splits) == 1}")
    if args.out:
        with open(args.out, "a") as f:
            for rs in rows.values():
                for r in rs:
                    f.write(json.dumps({k: v for k, v in r.items() if k != "split"}) + "\n")


if __name__ == "__main__":
    main()
