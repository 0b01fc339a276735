"""Several processes for one run (runtime.distributed): `--devices 2` on CPU over gloo, and two "nodes" started
by hand on one machine, give the one-process run's embeddings, split and test accuracy."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port, make_image_folder

from classforge.runtime.distributed import ProcessGroup, _per_node, launched_by_launcher, requested_processes


def test_shards_cover_every_item_once():
    items = list(range(11))
    for world in (1, 2, 3, 5):
        parts = [ProcessGroup(rank=r, world_size=world).shard(items) for r in range(world)]
        assert sorted(x for p in parts for x in p) == items


def test_processes_asked_for_and_what_a_launcher_says(monkeypatch):
    assert requested_processes("auto", 1) == 1 and requested_processes("2", 1) == 2
    assert requested_processes(1, 2) == 2 and requested_processes("0,1", 2) == 4
    for k in ("WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID", "SLURM_NTASKS",
              "SLURM_NNODES", "SLURM_NTASKS_PER_NODE", "SLURM_JOB_NAME"):
        monkeypatch.delenv(k, raising=False)
    assert not launched_by_launcher()
    # torchrun --nnodes 2 --nproc-per-node 4
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert launched_by_launcher() and _per_node("auto", 1) == (4, 2)
    for k in ("WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k)
    # sbatch --nodes 3 --ntasks-per-node 2
    monkeypatch.setenv("SLURM_NTASKS", "6")
    monkeypatch.setenv("SLURM_NNODES", "3")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "2(x3)")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    assert launched_by_launcher() and _per_node("auto", 1) == (2, 3)
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")  # srun --pty bash: one process, not a launch
    assert not launched_by_launcher()


def train_cmd(data: Path, out: Path, *more: str) -> list[str]:
    return [sys.executable, "-m", "classforge.cli", "train", str(data), "--out", str(out), "--accelerator", "cpu",
            "--batch-size", "8", *more]


def run_env(cache: Path, **more: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "RANK")}
    return {**env, "CLASSFORGE_QUIET": "1", "CLASSFORGE_CACHE": str(cache), **more}


def failure(stdout: str, stderr: str) -> str:
    """What every process said: each one's error is in the output (the first to fail is often not the last)."""
    return f"stdout: {stdout[-2000:]}\nstderr (start): {stderr[:4000]}\nstderr (end): {stderr[-4000:]}"


def cached_rows(cache: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(cache)): np.load(p) for p in sorted((cache / "embeddings").rglob("*.npy"))}


def predictions(run: Path) -> list[tuple[str, str]]:
    with open(run / "predictions.csv") as f:
        return [(r["path"], r["predicted"]) for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """A linear run in one process, with its own embedding cache."""
    tmp = tmp_path_factory.mktemp("one")
    data = make_image_folder(tmp / "d", 14, kinds=("circle", "stripes"))
    out = subprocess.run(train_cmd(data, tmp / "run"), capture_output=True, text=True, timeout=600,
                         env=run_env(tmp / "cache"))
    assert out.returncode == 0, failure(out.stdout, out.stderr)
    return data, tmp / "run", tmp / "cache"


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


@pytest.mark.trains
@pytest.mark.server
def test_two_processes_give_the_one_process_run(one_process, tmp_path):
    data, run1, cache1 = one_process
    out = subprocess.run(train_cmd(data, tmp_path / "run", "--devices", "2"), capture_output=True, text=True,
                         timeout=600, env=run_env(tmp_path / "cache"))
    assert out.returncode == 0, failure(out.stdout, out.stderr)
    s1, s2 = summary(run1), summary(tmp_path / "run")
    e = s2["embeddings"]
    assert e["world_size"] == 2 and s1["embeddings"]["world_size"] == 1
    shares = sorted(p["computed"] for p in e["per_process"])
    assert len(shares) == 2 and shares[0] > 0 and sum(shares) == s1["embeddings"]["computed"] == e["computed"]
    assert (run1 / "split.csv").read_text() == (tmp_path / "run" / "split.csv").read_text()
    one, two = cached_rows(cache1), cached_rows(tmp_path / "cache")
    assert one.keys() == two.keys() and len(one) == s1["embeddings"]["computed"]
    assert all(np.allclose(one[k], two[k], atol=1e-5) for k in one)
    assert s2["test"]["accuracy"] == s1["test"]["accuracy"] and predictions(run1) == predictions(tmp_path / "run")


@pytest.mark.trains
@pytest.mark.server
def test_two_nodes_started_by_hand_without_a_shared_cache(one_process, tmp_path):
    """Two "nodes" on one machine (MASTER_ADDR=127.0.0.1, gloo), each with its own cache: the main process
    finds the other's rows missing, embeds them itself and says so; the run is the one-process run."""
    data, run1, _ = one_process
    two_nodes(data, tmp_path / "run", tmp_path)
    s1, s2 = summary(run1), summary(tmp_path / "run")
    e = s2["embeddings"]
    other = next(p["computed"] for p in e["per_process"] if p["rank"] == 1)
    assert e["world_size"] == 2 and other > 0 and e["missing_from_shared_cache"] == other
    assert "CLASSFORGE_CACHE" in (tmp_path / "run" / "report.html").read_text()
    assert s2["test"]["accuracy"] == s1["test"]["accuracy"] and predictions(run1) == predictions(tmp_path / "run")
    assert len(cached_rows(tmp_path / "cache1")) == other  # node 1 wrote only its share, and read nothing more
    # again: node 0's cache now holds every row, node 1's only its share; the main node's view decides what is
    # missing, so both make the same calls (different views would leave one waiting for the other)
    two_nodes(data, tmp_path / "again", tmp_path)
    again = summary(tmp_path / "again")
    assert again["embeddings"]["computed"] == 0 and again["test"]["accuracy"] == s1["test"]["accuracy"]


def two_nodes(data: Path, out: Path, tmp_path: Path) -> None:
    """Both nodes' output goes to files: a node blocked on a full pipe that nobody reads would leave the other
    waiting for it in a collective."""
    port = str(free_port())
    logs = [(tmp_path / f"{out.name}-node{node}.out", tmp_path / f"{out.name}-node{node}.err") for node in (0, 1)]
    procs = []
    for node, (stdout, stderr) in enumerate(logs):
        with open(stdout, "w") as o, open(stderr, "w") as e:
            procs.append(subprocess.Popen(
                train_cmd(data, out, "--devices", "1", "--num-nodes", "2"), stdout=o, stderr=e, text=True,
                env=run_env(tmp_path / f"cache{node}", MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2",
                            NODE_RANK=str(node), LOCAL_RANK="0")))
    for p, (stdout, stderr) in zip(procs, logs):
        p.wait(timeout=300)
        assert p.returncode == 0, failure(stdout.read_text(), stderr.read_text())


@pytest.mark.trains
@pytest.mark.server
def test_a_two_process_fine_tune_makes_one_run_folder(tmp_path):
    data = make_image_folder(tmp_path / "d", 12, kinds=("circle", "stripes"))
    work = tmp_path / "work"
    work.mkdir()
    cmd = [sys.executable, "-m", "classforge.cli", "train", str(data), "--backbone", "cnn_small", "--strategy",
           "finetune", "--epochs", "1", "--batch-size", "8", "--accelerator", "cpu", "--devices", "2"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=work,
                         env=run_env(tmp_path / "cache", PYTHONPATH=str(Path(__file__).resolve().parents[2] / "src")))
    assert out.returncode == 0, failure(out.stdout, out.stderr)
    runs = list((work / "runs").iterdir())
    assert len(runs) == 1, runs  # the default name has the start time in it: both processes use the main one's
    assert summary(runs[0])["trainer"]["world_size"] == 2


def test_num_workers_auto_feeds_a_gpu_and_leaves_a_cpus_cores_to_training():
    from classforge.core.errors import ClassforgeError
    from classforge.training.fit import loader_workers

    assert loader_workers("auto", gpu=False) == 0
    assert 1 <= loader_workers("auto", gpu=True) <= 8
    assert loader_workers("3", gpu=False) == 3 and loader_workers(2, gpu=True) == 2
    with pytest.raises(ClassforgeError, match="--num-workers must be a number or auto"):
        loader_workers("many", gpu=False)


def test_a_gpu_asked_for_where_there_is_none_is_a_clear_error(linear_run, shapes_dir, tmp_path):
    import torch

    import classforge
    from classforge.core.errors import ClassforgeError

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    image = str(sorted(shapes_dir.rglob("*.png"))[0])
    out = subprocess.run([sys.executable, "-m", "classforge.cli", "predict", str(linear_run), image, "--device", "cuda"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "no CUDA device" in out.stdout + out.stderr and "Traceback" not in out.stderr
    with pytest.raises(ClassforgeError, match="no CUDA device"):
        classforge.train(shapes_dir, tmp_path / "gpu", accelerator="gpu")
    assert not (tmp_path / "gpu").exists()
