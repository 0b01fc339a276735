"""Head-only transfer learning: (a) the source projects' way vs (b) classforge's cached embeddings.

(a) A Lightning loop with the frozen backbone in the model: every batch of every epoch decodes the images and
    runs the backbone forward (eager fp32, as a notebook does), then trains the Linear head.
(b1) classforge: embeddings extracted once (the `auto` engine: channels_last + bf16 autocast where the CPU
    has native bf16, else ONNX Runtime fp32; decode included, cached on disk), then the *same* head recipe (Adam 1e-3, batch 32, 10 epochs) on the tensors.
(b2) classforge's own head recipe on the same cached tensors (standardised features, AdamW, early stopping).
Same split, same backbone. Also: extraction throughput vs the raw backbone forward.

Pokémon sprites: labels and groups from manifest.csv (group = game family, so a family never straddles splits).

Usage: python benchmarks/head_training.py [--datasets hymenoptera,pokemon] [--epochs 10] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
os.environ.setdefault("CLASSFORGE_QUIET", "1")


def machine() -> str:
    try:
        cpu = [ln.split(":", 1)[1].strip() for ln in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
               if ln.startswith("Model name")][0]
    except Exception:  # noqa: BLE001
        cpu = platform.processor()
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def dataset_cfg(name: str):
    from classforge.core.config import TrainConfig

    if name == "hymenoptera":
        return TrainConfig(data=str(SHARED / "hymenoptera"))
    if name == "pokemon":
        # whole game families kept together (group = manifest.csv's family), as in the family check
        import csv

        root = SHARED / "pokemon_gen1_sprites"
        out = Path(tempfile.mkdtemp(prefix="cf-bench-poke-")) / "families.csv"
        with open(root / "manifest.csv") as f, open(out, "w", newline="") as g:
            w = csv.writer(g)
            w.writerow(["path", "label", "group"])
            for r in csv.DictReader(f):
                w.writerow([r["path"], r["class"], r["family"]])
        return TrainConfig(data=str(root), labels_csv=str(out))
    raise SystemExit(f"unknown dataset {name}")


class FrozenLoop(torch.nn.Module):
    def __init__(self, backbone, n_classes):
        super().__init__()
        self.backbone = backbone.eval()
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.head = torch.nn.Linear(backbone.feature_dim, n_classes)

    def forward(self, x):
        with torch.no_grad():
            f = self.backbone(x)
        return self.head(f)


def run_a(data, backbone, epochs: int, bs: int = 32) -> dict:
    """The notebook way: backbone forward on every batch of every epoch, inside Lightning."""
    import lightning as L
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, Dataset

    from classforge.data.image import eval_transform, open_image

    tf = eval_transform(backbone.spec)

    class Files(Dataset):
        def __init__(self, ss, ys):
            self.ss, self.ys = ss, ys

        def __len__(self):
            return len(self.ss)

        def __getitem__(self, i):
            return tf(open_image(self.ss[i].path)), self.ys[i]

    model = FrozenLoop(backbone, len(data.labels))

    class Mod(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.m = model

        def training_step(self, b, i):
            x, y = b
            return F.cross_entropy(self.m(x), y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.m.head.parameters(), lr=1e-3)

    dl = DataLoader(Files(data.of("train"), data.y("train")), batch_size=bs, shuffle=True, num_workers=0)
    t = time.time()
    tr = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False)
    tr.fit(Mod(), dl)
    fit_s = time.time() - t
    model.eval()
    ys, ps = [], []
    with torch.no_grad():
        for x, y in DataLoader(Files(data.of("test"), data.y("test")), batch_size=64):
            ps.append(model(x).argmax(1))
            ys.append(y)
    acc = float((torch.cat(ps) == torch.cat(ys)).float().mean())
    return {"wall_s": round(time.time() - t, 1), "fit_s": round(fit_s, 1), "test_acc": round(acc, 4)}


def run_b(data, cfg, backbone, epochs: int, bs: int = 32, engine_name: str = "auto") -> dict:
    """classforge: extract once (the engine's fast path, cached; export/quantization time included), then train
    heads on tensors."""
    import torch.nn.functional as F

    from classforge.data.preprocess import make_preprocessor
    from classforge.runtime import embeddings as emb
    from classforge.runtime.engines import engine_for
    from classforge.training.head import fit_head

    pre = make_preprocessor(backbone.spec)
    engine = engine_for(engine_name)
    key = emb.features_key(cfg.backbone, backbone, "bench", engine)
    t0 = time.time()
    feats = {}
    build_s = loop_s = 0.0
    for sp in ("train", "val", "test"):
        ss = data.of(sp)
        f, st = emb.extract(backbone, ss, [data.checked.info[s.path].sha1 for s in ss], pre, key, 1, engine=engine)
        feats[sp] = f[:, 0]
        build_s, loop_s = build_s + st.get("build_s", 0.0), loop_s + st.get("loop_s", 0.0)
    extract_s = time.time() - t0
    n_files = sum(len(data.of(sp)) for sp in ("train", "val", "test"))
    ytr, yte = torch.tensor(data.y("train")), torch.tensor(data.y("test"))
    xtr, xte = torch.from_numpy(feats["train"]), torch.from_numpy(feats["test"])
    # (b1) the same head recipe as (a)
    t = time.time()
    torch.manual_seed(0)
    head = torch.nn.Linear(xtr.shape[1], len(data.labels))
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(xtr))
        for i in range(0, len(xtr), bs):
            idx = perm[i:i + bs]
            opt.zero_grad()
            F.cross_entropy(head(xtr[idx]), ytr[idx]).backward()
            opt.step()
    b1_fit = time.time() - t
    with torch.no_grad():
        b1_acc = float((head(xte).argmax(1) == yte).float().mean())
    # (b2) classforge's head recipe (Lightning, standardised features, early stopping on val)
    t = time.time()
    head2 = torch.nn.Linear(xtr.shape[1], len(data.labels))
    with tempfile.TemporaryDirectory() as d:
        fit_head(head2, feats["train"], np.array(data.y("train")), feats["val"], np.array(data.y("val")),
                 cfg.replace(epochs=epochs), Path(d))
    b2_fit = time.time() - t
    with torch.no_grad():
        b2_acc = float((head2(xte).argmax(1) == yte).float().mean())
    return {"engine": engine.key, "extract_s": round(extract_s, 1), "extract_files": n_files,
            "extract_files_per_s": round(n_files / extract_s, 1),
            # the same files over the extraction loops alone (decode + forward + cache writes), without the
            # engine's one-time export/trace (build_s)
            "engine_build_s": round(build_s, 2), "extract_loop_files_per_s": round(n_files / loop_s, 1),
            "b1_wall_s": round(extract_s + b1_fit, 1), "b1_test_acc": round(b1_acc, 4),
            "b2_wall_s": round(extract_s + b2_fit, 1), "b2_test_acc": round(b2_acc, 4)}


def forward_throughput(backbone, bs: int = 32, reps: int = 3) -> dict:
    x = torch.randn(bs, 3, backbone.spec.size, backbone.spec.size)
    out = {}
    m = backbone.eval()
    for name in ("eager_fp32", "channels_last", "channels_last_bf16"):
        mm = m.to(memory_format=torch.channels_last) if name != "eager_fp32" else m.to(memory_format=torch.contiguous_format)
        xx = x.contiguous(memory_format=torch.channels_last) if name != "eager_fp32" else x
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if name.endswith("bf16") else torch.autocast("cpu", enabled=False)
        with torch.inference_mode(), ctx:
            mm(xx)
            t = time.time()
            for _ in range(reps):
                mm(xx)
        out[name] = round(bs * reps / (time.time() - t), 1)
    m.to(memory_format=torch.contiguous_format)
    from classforge.runtime.engines import Engine, onnxruntime_available

    if onnxruntime_available():
        with tempfile.TemporaryDirectory() as d:
            run = Engine("onnx").build(m, Path(d))
            run(x)
            t = time.time()
            for _ in range(reps):
                run(x)
            out["onnxruntime_fp32"] = round(bs * reps / (time.time() - t), 1)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="hymenoptera,pokemon")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--out", default=None)
    ap.add_argument("--engines", default="auto",
                    help="extraction engines for (b), comma-separated: auto,torch,onnx (each with a fresh cache)")
    ap.add_argument("--skip-a", action="store_true", help="only (b): engines' speed and accuracy")
    args = ap.parse_args()
    if not SHARED.exists():
        sys.exit(f"{SHARED} not found: this benchmark needs ../shared/datasets")
    from classforge.models.registry import create_backbone
    from classforge.training.prepared import prepare_data

    # A fresh embedding cache so that (b) pays for its extraction.
    os.environ["CLASSFORGE_CACHE"] = tempfile.mkdtemp(prefix="cf-bench-")
    results = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"), "epochs": args.epochs, "runs": {}}
    bb = create_backbone("efficientnet_lite0")
    results["forward_images_per_s_batch32"] = forward_throughput(bb)
    print(json.dumps(results["forward_images_per_s_batch32"]))
    for name in args.datasets.split(","):
        cfg = dataset_cfg(name).replace(backbone="efficientnet_lite0")
        data = prepare_data(cfg)
        counts = {sp: len(data.of(sp)) for sp in ("train", "val", "test")}
        bs = {}
        for eng in args.engines.split(","):
            os.environ["CLASSFORGE_CACHE"] = tempfile.mkdtemp(prefix=f"cf-bench-{eng}-")
            bs[eng] = run_b(data, cfg, create_backbone("efficientnet_lite0"), args.epochs, engine_name=eng)
            print(name, eng, json.dumps(bs[eng]), flush=True)
        b = bs[args.engines.split(",")[0]]
        res = {"split": counts, "classes": len(data.labels), "b": b, "b_by_engine": bs}
        if not args.skip_a:
            a = run_a(data, create_backbone("efficientnet_lite0"), args.epochs)
            res.update(a=a, speedup_b1=round(a["wall_s"] / b["b1_wall_s"], 1),
                       speedup_b2=round(a["wall_s"] / b["b2_wall_s"], 1))
        results["runs"][name] = res
        print(name, json.dumps(res), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
