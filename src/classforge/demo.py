"""`classforge demo`: the whole flow on scikit-learn's handwritten digits (they ship inside scikit-learn)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from classforge.core.cache import cache_dir


def write_digits(dest: Path | None = None, size: int = 32) -> Path:
    """1,797 8x8 digit images from sklearn, upscaled to size x size PNGs in one folder per class."""
    from sklearn.datasets import load_digits

    dest = dest or cache_dir() / "demo" / "digits"
    marker = dest / ".complete"
    if marker.exists():
        return dest
    d = load_digits()
    for i, (img, y) in enumerate(zip(d.images, d.target)):
        folder = dest / str(y)
        folder.mkdir(parents=True, exist_ok=True)
        a = (255 - img * (255.0 / 16)).clip(0, 255).astype(np.uint8)  # dark ink on white paper
        Image.fromarray(a).resize((size, size), Image.BICUBIC).save(folder / f"{y}_{i:04d}.png")
    marker.touch()
    return dest


def demo_config(out: str = "runs/demo", backbone: str = "efficientnet_lite0"):
    """The digits written (once) and the TrainConfig of the demo's run on them (api.demo trains it)."""
    from classforge.core.config import TrainConfig

    data = write_digits()
    print(f"Demo data: {len(list(data.rglob('*.png')))} digit images in {data}")
    return TrainConfig(data=str(data), out=out, backbone=backbone, strategy="linear")
