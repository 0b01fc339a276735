"""classforge as users install it: a wheel built from this checkout, installed with its extras into a fresh
virtual environment (nothing from the development one), runs `classforge --version`, trains and predicts."""

from __future__ import annotations

import subprocess
import sys
import venv
from importlib.metadata import version
from pathlib import Path

import pytest
from conftest import make_image_folder

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=1200, **kw)
    assert out.returncode == 0, f"{cmd}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out


def test_wheel_installs_with_extras_into_a_fresh_venv_and_works(tmp_path):
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", dist, ROOT])
    wheel = next(dist.glob("classforge-*.whl"))
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    # PyTorch as the README says (the versions this checkout runs with), then the wheel with its extras
    _run([py, "-m", "pip", "install", "-q", f"torch=={version('torch')}", f"torchvision=={version('torchvision')}"])
    _run([py, "-m", "pip", "install", "-q", f"{wheel}[audio,serve]"])
    cli = env_dir / "bin" / "classforge"
    assert _run([cli, "--version"]).stdout.strip().endswith(version("classforge"))
    data = make_image_folder(tmp_path / "data", 10, kinds=("circle", "stripes"))
    _run([cli, "train", data, "--out", tmp_path / "run", "--backbone", "cnn_small", "--strategy", "scratch",
          "--epochs", "2"], cwd=tmp_path)
    one = next((data / "circle").glob("*.png"))
    said = _run([cli, "predict", tmp_path / "run", one, "--json"], cwd=tmp_path).stdout
    assert '"label"' in said
    # the installed package is the wheel's, not this checkout's source
    where = _run([py, "-c", "import classforge, pathlib; print(pathlib.Path(classforge.__file__).resolve())"])
    assert str(env_dir) in where.stdout and str(ROOT / "src") not in where.stdout
