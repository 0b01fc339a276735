"""The same classforge command quiet, beside a busy loop, and beside a second classforge run: per-phase times and
their ratios (2.0 is the fair share on 2 cores).

    python benchmarks/contention.py train DATA [--rounds 2] [--out results.json]   # phases from summary.json
    python benchmarks/contention.py predict RUN FILE [FILE ...]                  # `classforge predict` wall time
    python benchmarks/contention.py serve RUN IMAGE [--requests 200]             # single-client POST /predict

Each condition runs its rounds back to back with a fresh embedding cache (so embeddings are computed); the busy
loop is one CPU-bound Python process, bounded in time and killed after each run.
"""

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

CF = str(Path(sys.executable).with_name("classforge"))
PHASES = ("embedding_s", "fit_s", "eval_s", "total_s")


def busy_loop(seconds: float = 900) -> subprocess.Popen:
    code = f"import time\nend = time.time() + {seconds}\nwhile time.time() < end: pass"
    return subprocess.Popen([sys.executable, "-c", code])


def competitor(kind: str, data: str, tmp: Path) -> subprocess.Popen | None:
    if kind == "busy":
        return busy_loop()
    if kind == "classforge":  # a second training run on the same data, its own cache
        env = {**os.environ, "CLASSFORGE_QUIET": "1", "CLASSFORGE_CACHE": str(tmp / "other-cache")}
        return subprocess.Popen([CF, "train", data, "--out", str(tmp / "other-run")], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return None


def train_once(data: str, kind: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "CLASSFORGE_QUIET": "1", "CLASSFORGE_CACHE": str(tmp / "cache")}
        other = competitor(kind, data, tmp)
        try:
            t = time.time()
            subprocess.run([CF, "train", data, "--out", str(tmp / "run")], env=env, check=True,
                           capture_output=True, text=True)
            wall = time.time() - t
        finally:
            if other is not None:
                other.kill()
                other.wait()
        s = json.loads((tmp / "run" / "summary.json").read_text())
        row = {k: round(s["timing"].get(k, 0.0), 2) for k in PHASES}
        row.update(wall_s=round(wall, 2), accuracy=s["test"]["accuracy"], scored=s["evaluation"])
        return row


def train(args) -> None:
    out = {}
    kinds = args.conditions.split(",")
    for kind in kinds:
        rows = [train_once(args.data, kind) for _ in range(args.rounds)]
        out[kind] = {k: statistics.median(r[k] for r in rows) for k in (*PHASES, "wall_s")}
        out[kind]["accuracy"] = rows[-1]["accuracy"]
        print(kind, json.dumps(out[kind]), flush=True)
    for kind in [k for k in kinds if k != "quiet" and "quiet" in kinds]:
        out[f"{kind}/quiet"] = {k: round(out[kind][k] / max(out["quiet"][k], 1e-9), 2) for k in (*PHASES, "wall_s")}
        print(f"{kind}/quiet", json.dumps(out[f"{kind}/quiet"]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2))


def predict(args) -> None:
    out = {}
    for kind in ("quiet", "busy"):
        walls = []
        for _ in range(args.rounds):
            other = busy_loop() if kind == "busy" else None
            try:
                t = time.time()
                subprocess.run([CF, "predict", args.run, *args.files], check=True, capture_output=True)
                walls.append(time.time() - t)
            finally:
                if other is not None:
                    other.kill()
        out[kind] = round(statistics.median(walls), 3)
        print(kind, out[kind], "s", flush=True)
    out["busy/quiet"] = round(out["busy"] / out["quiet"], 2)
    print(json.dumps(out))


def serve(args) -> None:
    import requests

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from inference import start_server, stop  # benchmarks/inference.py

    proc, url = start_server(Path(args.run), "auto", os.cpu_count() or 1)
    try:
        body = Path(args.image).read_bytes()
        out = {}
        for kind in ("quiet", "busy"):
            other = busy_loop() if kind == "busy" else None
            try:
                lat = []
                for _ in range(args.requests):
                    t = time.perf_counter()
                    r = requests.post(url + "/predict", files={"file": ("x.jpg", body, "image/jpeg")}, timeout=60)
                    r.raise_for_status()
                    lat.append((time.perf_counter() - t) * 1000)
            finally:
                if other is not None:
                    other.kill()
            lat.sort()
            out[kind] = {"p50_ms": round(lat[len(lat) // 2], 1), "p99_ms": round(lat[int(len(lat) * 0.99) - 1], 1)}
            print(kind, json.dumps(out[kind]), flush=True)
        out["busy/quiet p50"] = round(out["busy"]["p50_ms"] / out["quiet"]["p50_ms"], 2)
        print(json.dumps(out))
    finally:
        stop(proc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(required=True)
    p = sub.add_parser("train")
    p.add_argument("data")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out")
    p.add_argument("--conditions", default="quiet,busy,classforge",
                   help="which of quiet, busy (a CPU-bound loop beside it), classforge (a second run beside it)")
    p.set_defaults(fn=train)
    p = sub.add_parser("predict")
    p.add_argument("run")
    p.add_argument("files", nargs="+")
    p.add_argument("--rounds", type=int, default=3)
    p.set_defaults(fn=predict)
    p = sub.add_parser("serve")
    p.add_argument("run")
    p.add_argument("image")
    p.add_argument("--requests", type=int, default=200)
    p.set_defaults(fn=serve)
    args = ap.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
