"""Shared fixtures: tiny generated image folders (real PNG/JPEG files), the ../shared data when present."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import threading
import time
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


# ------------------------------------------------------------------------------------------- what a test costs
# A test that trains a model or starts a server is marked `trains` / `server`: by the fixtures it uses, or by
# what its own body calls. `make test-fast` leaves them out. A test that trains in-process without the mark
# fails (the guard below), so the marks cannot go stale.
TRAINING_FIXTURES = {"linear_run", "audio_run", "budget_run", "small_run", "comparison", "exported_run",
                     "sane_run", "cnn_run"}
SERVER_FIXTURES = {"server", "ui_server", "browser"}
_TRAINING_CALLS = ("classforge.train(", "run_train(", '"train"', "compare(", "search(", "sweep-batch", "demo(")
_SERVER_CALLS = ("Popen(", '"serve"', "uvicorn", "create_app(")


def _calls(item, needles) -> bool:
    import inspect

    try:
        source = inspect.getsource(item.function)
    except (OSError, TypeError):
        return False
    return any(n in source for n in needles)


def pytest_collection_modifyitems(config, items):
    import torch

    no_gpu = pytest.mark.skip(reason="needs a CUDA device (benchmarks/gpu_check.sh runs these on a GPU machine)")
    for item in items:
        if item.get_closest_marker("gpu") and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        names = set(getattr(item, "fixturenames", ()))
        if names & TRAINING_FIXTURES or _calls(item, _TRAINING_CALLS):
            item.add_marker(pytest.mark.trains)
        if names & SERVER_FIXTURES or _calls(item, _SERVER_CALLS):
            item.add_marker(pytest.mark.server)


_trained_in: set[str] = set()


@pytest.fixture(scope="session", autouse=True)
def _record_training():
    """Every in-process training run, by the test that was running (a module fixture counts for its first test)."""
    from classforge.training import run

    real = run.train

    def recording(cfg, *args, **kwargs):
        _trained_in.add(os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0])
        return real(cfg, *args, **kwargs)

    run.train = recording
    yield
    run.train = real


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if call.when == "teardown" and item.nodeid in _trained_in and not item.get_closest_marker("trains"):
        report.outcome = "failed"
        report.longrepr = (f"{item.nodeid} trains a model but is not marked `trains`: use a training fixture "
                           "(conftest.TRAINING_FIXTURES) or add @pytest.mark.trains")


def bad_image_folder(root: Path) -> Path:
    """Two classes of good images plus a truncated JPEG, an empty PNG, a text file named .jpg, a 1-pixel image
    and a decompression bomb."""
    make_image_folder(root, 12, kinds=("circle", "stripes"))
    good = root / "circle" / "circle_000.png"
    jpg = root / "circle" / "truncated.jpg"
    draw_sample("circle", np.random.default_rng(5), 128).save(jpg, quality=90)
    jpg.write_bytes(jpg.read_bytes()[: len(jpg.read_bytes()) // 2])
    (root / "circle" / "empty.png").write_bytes(b"")
    (root / "stripes" / "notes.jpg").write_text("this is a text file, not an image")
    Image.new("RGB", (1, 1), (10, 20, 30)).save(root / "stripes" / "tiny.png")
    # a PNG header that claims 20000 x 20000 pixels: a decompression bomb
    bomb = Image.new("L", (20000, 20000))
    bomb.save(root / "stripes" / "bomb.png", optimize=True)
    assert good.exists()
    return root


@pytest.fixture(scope="session")
def exported_run(linear_run, tmp_path_factory) -> Path:
    """A copy of linear_run with model.onnx + model.int8.onnx (the shared run stays PyTorch-only for others)."""
    run = tmp_path_factory.mktemp("exported") / "linear"
    shutil.copytree(linear_run, run, ignore=shutil.ignore_patterns("checkpoints", "lightning_logs"))
    from classforge.deploy.onnx import export_run

    export_run(run, quantize="int8")
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1 in a background thread, on a socket bound here (so no other process can
    take the port between choosing it and listening on it). `config`: a uvicorn.Config to use instead of the
    default one; its host and port are ignored."""

    def __init__(self, app, config=None):
        import uvicorn  # the serve extra

        self.app = app
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = config or uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        t = time.time()
        while not self.server.started:
            if time.time() - t > 60 or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()
        self.app.state.predictor.close()
