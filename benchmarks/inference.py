"""Batch-1 inference latency: eager fp32 PyTorch vs ONNX Runtime for a run's model, and the p50 latency of
POST /predict with one 224-px JPEG through `classforge serve` (ONNX Runtime and PyTorch backends).

    python benchmarks/inference.py RUN_DIR [--threads 2] [--iters 200] [--requests 200] [--append benchmarks/results/DATE-inference.md]

Exports RUN/model.onnx first if it is missing. The server runs in a subprocess on 127.0.0.1 (no UI), so client
and server do not share an interpreter; on a 2-core machine they do share the cores, as a real client would."""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def timed(fn, iters: int, warmup: int = 10) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


def machine() -> str:
    cpu = platform.processor() or ""
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    one, five, fifteen = os.getloadavg()
    load = f", load average {one:.1f}/{five:.1f}/{fifteen:.1f} (1/5/15 min; other jobs share the cores)"
    return f"{os.cpu_count()} CPUs (nproc), {cpu}, Python {platform.python_version()}{load}"


def test_image(run: Path) -> tuple[Path, bytes]:
    """One of the run's test images as a 224x224 JPEG (what a client would typically send)."""
    from PIL import Image

    from classforge.deploy.onnx import run_files

    files = run_files(run, ("test", "val", "train"))
    if not files:
        raise SystemExit(f"{run}: its data files are not on this machine; the benchmark needs one real image")
    path = files[0][0]
    b = io.BytesIO()
    Image.open(path).convert("RGB").resize((224, 224)).save(b, "JPEG", quality=90)
    return path, b.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: Path, backend: str, threads: int, extra: list[str] = ()) -> tuple[subprocess.Popen, str]:
    import requests

    port = free_port()
    cmd = [sys.executable, "-m", "classforge.cli", "serve", str(run), "--port", str(port), "--no-ui",
           "--backend", backend, "--log-level", "warning", *extra]
    if backend != "torch":
        cmd += ["--threads", str(threads)]
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", OMP_NUM_THREADS=str(threads))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    t = time.time()
    while time.time() - t < 180:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read()[-2000:]}")
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except requests.ConnectionError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("server did not start within 180 s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()


def post_latency(url: str, jpeg: bytes, n: int) -> dict:
    import requests

    s = requests.Session()
    lat, codes = [], {}

    def one():
        r = s.post(url + "/predict", files={"file": ("probe.jpg", jpeg, "image/jpeg")}, timeout=60)
        codes[r.status_code] = codes.get(r.status_code, 0) + 1

    lat = timed(one, n, warmup=10)
    return {"n": n, "p50_ms": pct(lat, 50), "p90_ms": pct(lat, 90), "p99_ms": pct(lat, 99), "status": codes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a run directory (image task)")
    ap.add_argument("--threads", type=lambda v: [int(t) for t in v.split(",")], default=[2],
                    help="intra-op threads for PyTorch and ONNX Runtime; a list such as 1,2 measures each "
                         "(the server uses the first)")
    ap.add_argument("--iters", type=int, default=200, help="timed forward passes per engine")
    ap.add_argument("--requests", type=int, default=200, help="timed sequential POST /predict per backend")
    ap.add_argument("--append", type=Path, help="append a Markdown section with the figures to this file (a result file under benchmarks/results/; add its row to benchmarks/RESULTS.md)")
    a = ap.parse_args()

    import torch

    from classforge.core.spec import InputSpec
    from classforge.runtime.predictor import Predictor, load_run_model

    torch.set_num_threads(a.threads[0])
    run = a.run
    if not (run / "model.onnx").is_file():
        from classforge.deploy.onnx import export_run

        print("exporting model.onnx first ...", flush=True)
        export_run(run, model_card=False)
    path, jpeg = test_image(run)
    model, meta, labels = load_run_model(run)
    spec = InputSpec.from_dict(meta["spec"])
    pre = Predictor(model, spec, labels, fast=False)
    x = pre.preprocess(jpeg)[None]  # (1, 3, 224, 224)

    res: dict = {"run": str(run), "backbone": meta["backbone"], "threads": a.threads, "image": path.name}
    from classforge.deploy.onnx import ort_session

    fast = Predictor(load_run_model(run)[0], spec, labels, fast=True)  # channels_last (+ bf16 where fast)
    xn = x.numpy()
    timings: dict[str, list[float]] = {}
    for th in a.threads:
        torch.set_num_threads(th)
        with torch.inference_mode():
            timings[f"eager_fp32 ({th} thr)"] = timed(lambda: model(x), a.iters)
        timings[f"torch_fast_path ({th} thr)"] = timed(lambda: fast.forward(x), a.iters)
        sess = ort_session(run / "model.onnx", threads=th)
        name = sess.get_inputs()[0].name
        timings[f"onnxruntime_fp32 ({th} thr)"] = timed(lambda s=sess, n=name: s.run(None, {n: xn}), a.iters)
        if (run / "model.int8.onnx").is_file():
            s8 = ort_session(run / "model.int8.onnx", threads=th)
            timings[f"onnxruntime_int8 ({th} thr)"] = timed(lambda s=s8, n=name: s.run(None, {n: xn}), a.iters)
        del sess
    engines = {k: {"p50_ms": pct(v, 50), "p90_ms": pct(v, 90), "mean_ms": statistics.fmean(v)}
               for k, v in timings.items()}
    res["engines"] = engines
    res["speedup_onnx_vs_eager_p50"] = {
        th: engines[f"eager_fp32 ({th} thr)"]["p50_ms"] / engines[f"onnxruntime_fp32 ({th} thr)"]["p50_ms"]
        for th in a.threads}

    res["post_predict"] = {}
    for backend in ("onnx", "torch"):
        proc, url = start_server(run, backend, a.threads[0])
        try:
            res["post_predict"][backend] = post_latency(url, jpeg, a.requests)
        finally:
            stop(proc)
    res["post_speedup_onnx_vs_torch_p50"] = (res["post_predict"]["torch"]["p50_ms"]
                                             / res["post_predict"]["onnx"]["p50_ms"])
    res["machine"] = machine()
    res["date"] = dt.datetime.now().isoformat(timespec="seconds")
    print(json.dumps(res, indent=2))
    md = markdown(res, " ".join([Path(sys.executable).name, *sys.argv]))
    print(md)
    if a.append:
        with open(a.append, "a") as f:
            f.write(md)


def markdown(r: dict, cmd: str) -> str:
    rows = "\n".join(f"| {k} | {v['p50_ms']:.2f} | {v['p90_ms']:.2f} | {v['mean_ms']:.2f} |"
                     for k, v in r["engines"].items())
    speedups = ", ".join(f"**{v:.2f}x** faster with {th} thread(s)" for th, v in r["speedup_onnx_vs_eager_p50"].items())
    posts = "\n".join(f"| {k} | {v['n']} | {v['p50_ms']:.1f} | {v['p90_ms']:.1f} | {v['p99_ms']:.1f} | {v['status']} |"
                      for k, v in r["post_predict"].items())
    return f"""
## Inference latency, batch 1 ({r['date'][:10]}, benchmarks/inference.py)

Machine: {r['machine']}. Run: `{r['run']}` ({r['backbone']}), threads {r['threads']}, input one 224-px JPEG of
the run's test split (`{r['image']}`).
Command: `{cmd}`

| engine (forward only, batch 1) | p50 ms | p90 ms | mean ms |
|---|---|---|---|
{rows}

ONNX Runtime vs eager fp32 PyTorch, p50: {speedups}.

| `POST /predict`, one 224-px JPEG, sequential, server backend | requests | p50 ms | p90 ms | p99 ms | status |
|---|---|---|---|---|---|
{posts}

Served through ONNX Runtime vs PyTorch (the Predictor's fast torch path), p50: **{r['post_speedup_onnx_vs_torch_p50']:.2f}x**.
The machine is shared with other jobs; figures are medians of repeated calls.
"""


if __name__ == "__main__":
    main()
