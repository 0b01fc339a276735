"""Peak server memory under a burst of large uploads, and whether it serves normally afterwards.

    python benchmarks/serve_memory.py RUN_DIR [--clients 16] [--megapixels 40] [--max-decoding-mb 1024]

Starts `classforge serve RUN_DIR --no-ui` on 127.0.0.1, sends `--clients` concurrent POST /predict, each with one
PNG of about `--megapixels` (under the default 40 MP limit), samples the server's resident memory (VmRSS, and
the kernel's high-water mark VmHWM) throughout, then sends one ordinary 224-px JPEG. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference import start_server, stop  # noqa: E402 - benchmarks/inference.py


def status_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def big_png(megapixels: float) -> bytes:
    """A photo-sized PNG that compresses to a few MB (flat colour tiles), so it passes the upload limit."""
    side = int((megapixels * 1e6) ** 0.5) - 1
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
    img = Image.fromarray(tiles).resize((side, side), Image.NEAREST)
    b = io.BytesIO()
    img.save(b, "PNG", optimize=True)
    return b.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--megapixels", type=float, default=40.0)
    ap.add_argument("--max-decoding-mb", type=float, default=None)
    args = ap.parse_args()
    extra = ["--max-decoding-mb", str(args.max_decoding_mb)] if args.max_decoding_mb is not None else []
    proc, url = start_server(Path(args.run), "auto", os.cpu_count() or 1, extra)
    try:
        png = big_png(args.megapixels)
        idle = status_mb(proc.pid, "VmRSS")
        peak, done = [idle], threading.Event()

        def sample():
            while not done.is_set():
                peak.append(status_mb(proc.pid, "VmRSS"))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()

        def post(_):
            r = requests.post(url + "/predict", files={"file": ("big.png", png, "image/png")}, timeout=300)
            return r.status_code

        t = time.time()
        with ThreadPoolExecutor(args.clients) as pool:
            codes = list(pool.map(post, range(args.clients)))
        burst_s = time.time() - t
        time.sleep(2)
        done.set()
        sampler.join()
        after = status_mb(proc.pid, "VmRSS")
        jpg = io.BytesIO()
        Image.new("RGB", (224, 224), (120, 80, 40)).save(jpg, "JPEG")
        normal = requests.post(url + "/predict", files={"file": ("x.jpg", jpg.getvalue(), "image/jpeg")}, timeout=60)
        health = requests.get(url + "/health", timeout=10).json()
        print(json.dumps({"upload_mb": round(len(png) / 2**20, 1), "megapixels": args.megapixels,
                          "clients": args.clients, "status_codes": {c: codes.count(c) for c in sorted(set(codes))},
                          "burst_s": round(burst_s, 1), "rss_idle_mb": round(idle), "rss_peak_sampled_mb": round(max(peak)),
                          "rss_hwm_mb": round(status_mb(proc.pid, "VmHWM")), "rss_after_mb": round(after),
                          "normal_request_after": normal.status_code, "decoding": health.get("decoding")}))
    finally:
        stop(proc)


if __name__ == "__main__":
    main()
