"""A large photo folder made from a small one, for timing classforge where a large real dataset (Imagewoof:
12,954 photos of about 500x375) is not on this machine.

    python benchmarks/large_folder.py ../shared/datasets/hymenoptera /tmp/large --copies 33
    python benchmarks/contention.py train /tmp/large --rounds 1 --conditions quiet,busy

Each source photo gives `copies` different files: a random crop of 70-100% of each side, a mirror image half the
time, brightness and colour shifted, saved as JPEG at quality 80-95 at the source's size. The train/val (or test)
folders and the class folders are kept, so a copy stays in its source's split. Copies of one photo are near
duplicates of each other (classforge keeps them in one split and says so); decoding, the forward passes and the
scoring cost what a real folder of that many photos of that size costs.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from PIL import Image, ImageEnhance, ImageOps

EXT = {".jpg", ".jpeg", ".png"}


def variant(img: Image.Image, rng: random.Random) -> Image.Image:
    w, h = img.size
    cw, ch = int(w * rng.uniform(0.7, 1.0)), int(h * rng.uniform(0.7, 1.0))
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    out = img.crop((x, y, x + cw, y + ch)).resize((w, h), Image.BILINEAR)
    if rng.random() < 0.5:
        out = ImageOps.mirror(out)
    out = ImageEnhance.Brightness(out).enhance(rng.uniform(0.8, 1.2))
    return ImageEnhance.Color(out).enhance(rng.uniform(0.7, 1.3))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path, help="a folder of photos: SPLIT/CLASS/*.jpg or CLASS/*.jpg")
    ap.add_argument("out", type=Path, help="where to write the large folder (must not exist)")
    ap.add_argument("--copies", type=int, default=33, help="files made from each source photo")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.out.exists():
        raise SystemExit(f"{args.out} exists; give a new folder")
    rng = random.Random(args.seed)
    files = sorted(p for p in args.src.rglob("*") if p.suffix.lower() in EXT)
    n = 0
    for p in files:
        rel = p.relative_to(args.src)
        dest = args.out / rel.parent
        dest.mkdir(parents=True, exist_ok=True)
        img = Image.open(p).convert("RGB")
        for k in range(args.copies):
            variant(img, rng).save(dest / f"{p.stem}-{k:02d}.jpg", quality=rng.randint(80, 95))
            n += 1
    print(f"{n} files from {len(files)} in {args.out}")


if __name__ == "__main__":
    main()
