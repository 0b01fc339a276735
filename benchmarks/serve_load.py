"""Load test of `classforge serve` on loopback: N concurrent clients, each sending M requests (bounded), one
224-px JPEG per request from the run's test split.

    python benchmarks/serve_load.py RUN_DIR [--clients 8] [--requests 500] [--append benchmarks/results/DATE-serve-load.md]
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --image x.jpg     # an already running server

Reports requests/s, p50/p95/p99 latency, counts per HTTP status, 5xx and dropped requests (connection errors or
timeouts), and the server's micro-batching figures. Exits 1 if any request got a 5xx or was dropped."""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference import machine, start_server, stop


def images(run: Path | None, image: Path | None, n: int = 16) -> list[bytes]:
    from PIL import Image

    if image:
        return [image.read_bytes()]
    from classforge.deploy.onnx import run_files

    files = [p for p, _, _ in run_files(run, ("test", "val"))][:n]
    if not files:
        raise SystemExit(f"{run}: its data files are not on this machine; pass --image")
    out = []
    for p in files:
        b = io.BytesIO()
        Image.open(p).convert("RGB").resize((224, 224)).save(b, "JPEG", quality=90)
        out.append(b.getvalue())
    return out


def client(url: str, payloads: list[bytes], m: int, offset: int, timeout: float, out: list, barrier) -> None:
    import requests

    s = requests.Session()
    barrier.wait()
    for i in range(m):
        data = payloads[(offset + i) % len(payloads)]
        t = time.perf_counter()
        try:
            r = s.post(url + "/predict", files={"file": (f"{offset}-{i}.jpg", data, "image/jpeg")}, timeout=timeout)
            status = r.status_code
            if status == 200:
                r.json()["results"][0]["label"]  # a well-formed answer, not just a status
        except Exception as e:  # noqa: BLE001 - connection reset, timeout, bad body: all count as dropped
            status = f"dropped:{type(e).__name__}"
        out.append((status, (time.perf_counter() - t) * 1000))


def run_load(url: str, payloads: list[bytes], clients: int, m: int, timeout: float) -> dict:
    import requests

    out: list = []
    barrier = threading.Barrier(clients + 1)
    threads = [threading.Thread(target=client, args=(url, payloads, m, c * 7, timeout, out, barrier))
               for c in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.array([ms for _, ms in out])
    codes: dict = {}
    for st, _ in out:
        codes[str(st)] = codes.get(str(st), 0) + 1
    health = requests.get(url + "/health", timeout=10).json()
    return {
        "clients": clients, "requests_per_client": m, "sent": clients * m, "answered": len(out),
        "wall_s": wall, "requests_per_s": len(out) / wall,
        "p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
        "p99_ms": float(np.percentile(lat, 99)), "max_ms": float(lat.max()), "status": codes,
        "errors_5xx": sum(n for k, n in codes.items() if k.isdigit() and int(k) >= 500),
        "errors_4xx": sum(n for k, n in codes.items() if k.isdigit() and 400 <= int(k) < 500),
        "dropped": sum(n for k, n in codes.items() if k.startswith("dropped")),
        "server": health,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, nargs="?", help="a run directory to serve (omit with --url)")
    ap.add_argument("--url", help="load an already running server instead of starting one")
    ap.add_argument("--image", type=Path, help="send this file (default: 16 of the run's test images at 224 px)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients (one keep-alive connection each)")
    ap.add_argument("--requests", type=int, default=500, help="requests per client")
    ap.add_argument("--timeout", type=float, default=60.0, help="per-request timeout (s); a timeout counts as dropped")
    ap.add_argument("--backend", default="auto", help="server backend when starting one: auto | onnx | torch")
    ap.add_argument("--threads", type=int, default=2, help="server ONNX Runtime threads when starting one")
    ap.add_argument("--server-arg", action="append", default=[], help="extra `classforge serve` flag (repeatable)")
    ap.add_argument("--append", type=Path, help="append a Markdown section with the figures to this file (a result file under benchmarks/results/; add its row to benchmarks/RESULTS.md)")
    a = ap.parse_args()
    if not a.url and not a.run:
        ap.error("give RUN_DIR or --url")
    payloads = images(a.run, a.image)
    proc = None
    if a.url:
        url = a.url.rstrip("/")
    else:
        proc, url = start_server(a.run, a.backend, a.threads, a.server_arg)
    try:
        res = run_load(url, payloads, a.clients, a.requests, a.timeout)
    finally:
        if proc:
            stop(proc)
    res.update(machine=machine(), date=dt.datetime.now().isoformat(timespec="seconds"), run=str(a.run or a.url),
               server_args=a.server_arg)
    print(json.dumps(res, indent=2))
    md = markdown(res, " ".join(["python", *sys.argv]))
    print(md)
    if a.append:
        with open(a.append, "a") as f:
            f.write(md)
    sys.exit(1 if res["errors_5xx"] or res["dropped"] or res["answered"] != res["sent"] else 0)


def markdown(r: dict, cmd: str) -> str:
    b = r["server"].get("batching") or {}
    batching = (f"{b['rows']} files in {b['calls']} forward passes (mean {b['rows'] / max(1, b['calls']):.2f}, "
                f"max {b['max_rows']} per pass)") if b else "off"
    return f"""
## Serving load test ({r['date'][:10]}, benchmarks/serve_load.py)

Machine: {r['machine']}; clients and server on the same cores, loopback. Run: `{r['run']}` (backend
{r['server'].get('backend')}). Command: `{cmd}`

| clients x requests | answered | wall s | requests/s | p50 ms | p95 ms | p99 ms | max ms | 5xx | 4xx | dropped |
|---|---|---|---|---|---|---|---|---|---|---|
| {r['clients']} x {r['requests_per_client']} | {r['answered']}/{r['sent']} | {r['wall_s']:.1f} | {r['requests_per_s']:.1f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['p99_ms']:.1f} | {r['max_ms']:.1f} | {r['errors_5xx']} | {r['errors_4xx']} | {r['dropped']} |

Status counts: {r['status']}. Micro-batching: {batching}.
"""


if __name__ == "__main__":
    main()
