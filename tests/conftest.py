"""Shared fixtures: tiny generated image folders (real PNG/JPEG files), the ../shared data when present."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def pytest_configure(config):
    os.environ.setdefault("CLASSFORGE_QUIET", "1")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("CLASSFORGE_OFFLINE", "1")  # tests never need the network
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if "CLASSFORGE_CACHE" not in os.environ:
        os.environ["CLASSFORGE_CACHE"] = str(Path(config.rootpath) / ".cache" / "classforge-tests")


def shared_path(*parts: str) -> Path:
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} not available (../shared is only present in development and CI)")
    return p


def draw_sample(kind: str, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """Three visually distinct kinds: filled circles, horizontal stripes, checkerboards, in random colours."""
    bg = tuple(int(v) for v in rng.integers(150, 256, 3))
    fg = tuple(int(v) for v in rng.integers(0, 110, 3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    if kind == "circle":
        r = int(rng.integers(size // 5, size // 3))
        cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif kind == "stripes":
        step = int(rng.integers(6, 12))
        off = int(rng.integers(0, step))
        for y in range(off, size, step):
            d.rectangle([0, y, size, y + step // 2 - 1], fill=fg)
    else:
        step = int(rng.integers(8, 16))
        for y in range(0, size, step):
            for x in range(0, size, step):
                if (x // step + y // step) % 2 == 0:
                    d.rectangle([x, y, x + step - 1, y + step - 1], fill=fg)
    noise = rng.integers(-12, 13, (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(img, dtype=int) + noise, 0, 255).astype(np.uint8))


def make_image_folder(root: Path, n_per_class: int = 24, kinds=("circle", "stripes", "checker"), seed: int = 0,
                      fmt: str = "png") -> Path:
    rng = np.random.default_rng(seed)
    for k in kinds:
        (root / k).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            draw_sample(k, rng).save(root / k / f"{k}_{i:03d}.{fmt}")
    return root


def tree_checksums(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="session")
def linear_run(shapes_dir, tmp_path_factory) -> Path:
    """One trained run (linear strategy on EfficientNet-Lite0) shared by the tests that read a run."""
    import classforge

    out = tmp_path_factory.mktemp("runs") / "linear"
    return classforge.train(shapes_dir, out, epochs=30)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """12 images of each of three kinds: the smallest folder a from-scratch CNN learns something on."""
    return make_image_folder(tmp_path_factory.mktemp("tiny") / "d", 12, kinds=("circle", "stripes", "checker"))
