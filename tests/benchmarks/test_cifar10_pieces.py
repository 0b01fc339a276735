"""The CIFAR-10 benchmark's own pieces (benchmarks/cifar10/): the Muon optimiser registered as `--optimizer muon`,
the batch-size sweep and the allocator tuning. They live outside the product and plug into its registries."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import classforge
from classforge.core.errors import ClassforgeError

CIFAR10 = Path(__file__).resolve().parents[2] / "benchmarks" / "cifar10"
sys.path.insert(0, str(CIFAR10))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))  # for the training tests' helpers


from test_budget_training import _one_step, _tiny_bn_net, read_csv  # noqa: E402 - shared helpers


def test_sweep_batch_cli_writes_its_table(tiny, tmp_path):
    out = tmp_path / "sweep"
    env = {**os.environ, "CLASSFORGE_QUIET": "1"}
    cmd = [sys.executable, str(CIFAR10 / "sweep.py"), "sweep-batch", str(tiny), "--batch-sizes", "4,16",
           "--time", "3s", "--out", str(out), "--backbone", "cnn_lenet"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert res.returncode == 0, res.stderr[-3000:] + res.stdout[-2000:]
    assert "Batch-size sweep" in res.stdout
    rows = read_csv(out / "sweep_batch.csv")
    assert [r["batch_size"] for r in rows] == ["4", "16"]
    for r in rows:
        assert float(r["epoch_time_s"]) > 0 and float(r["images_per_s"]) > 0 and r["val_acc"] and r["test_acc"]
        assert r["stopped_by"] == "time budget"
        assert float(r["epochs"]) > 0 and r["epoch_time"] in ("measured", "estimated")
        assert (out / f"bs{r['batch_size']}" / "metrics.csv").is_file()


# ------------------------------------------------------------------------------------------------ Muon
def test_orthogonalize_sets_singular_values_near_one_and_keeps_the_vectors():
    from optim import orthogonalize

    torch.manual_seed(0)
    for shape in ((16, 72), (72, 16)):  # wide (conv filters) and tall
        k = min(shape)
        u, _ = torch.linalg.qr(torch.randn(shape[0], k))
        v, _ = torch.linalg.qr(torch.randn(shape[1], k))
        g = u @ torch.diag(torch.logspace(-1.5, 1, k)) @ v.T  # singular values 0.03 .. 10
        o = orthogonalize(g)
        s = torch.linalg.svdvals(o)
        assert o.shape == g.shape and s.min() > 0.6 and s.max() < 1.25, s
        polar = u @ v.T  # the exact orthogonal factor
        assert torch.linalg.norm(o - polar) / torch.linalg.norm(polar) < 0.3
        assert torch.linalg.norm(g / g.norm() * k**0.5 - polar) / k**0.5 > 0.5  # g itself is far from it
    # a channels_last conv gradient is orthogonalised in its memory order: the same result, in its layout
    from optim import _orthogonal_like

    g4 = torch.randn(32, 24, 3, 3)
    o4 = _orthogonal_like(g4.contiguous(memory_format=torch.channels_last), 5)
    assert o4.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(o4, orthogonalize(g4.reshape(32, -1)).view_as(g4), atol=1e-5)


def test_muon_step_orthogonalises_backbone_matrices_and_keeps_their_norm():
    """--optimizer muon, one step without momentum: the conv's filters move by muon_lr x their norm along the
    orthogonalised gradient, then return to their starting norm; the head and all 1-D tensors take SGD."""
    from optim import orthogonalize

    net = _tiny_bn_net()
    x, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    lr, mlr = 0.1, 0.3
    ref = copy.deepcopy(net).train()
    g = torch.autograd.grad(torch.nn.functional.cross_entropy(ref(x), y), list(ref.parameters()))
    conv_w = ref[0].weight.detach()
    o = orthogonalize(g[0].reshape(4, -1)).view_as(conv_w)
    n0 = conv_w.norm()
    moved = conv_w - mlr * n0 / o.norm() * o
    expected = [moved * n0 / moved.norm()] + [p.detach() - lr * gi for p, gi in zip(list(ref.parameters())[1:], g[1:])]

    backbone, head = [p for m in list(net)[:-1] for p in m.parameters()], list(net[-1].parameters())
    _one_step(net, x, y, sam=0.0, lr=lr, optimizer="muon", groups=[(backbone, lr), (head, lr)],
              optimizer_args={"muon_lr": mlr})
    for p, e in zip(net.parameters(), expected):
        assert torch.allclose(p.detach(), e, atol=1e-5)
    assert float(net[0].weight.norm()) == pytest.approx(float(n0), rel=1e-5)
    sgd = conv_w - lr * g[0]  # plain SGD would have gone elsewhere (so the test can fail)
    assert not torch.allclose(net[0].weight.detach(), sgd, atol=1e-3)


def test_muon_through_train_and_its_errors(tiny, tmp_path):
    run = classforge.train(tiny, tmp_path / "m", backbone="cnn_small", strategy="scratch", epochs=2, batch_size=8,
                           patience=1000, optimizer="muon", optimizer_args={"muon_lr": 0.1}, schedule="onecycle",
                           lr="0.05")
    rows = read_csv(run / "metrics.csv")[1:]
    assert len(rows) == 2 and all(float(r["train_loss"]) > 0 for r in rows)
    trainer = json.loads((run / "summary.json").read_text())["trainer"]
    assert trainer["optimizer"] == "muon" and trainer["optimizer_args"] == {"muon_lr": 0.1}
    for bad in (0, -0.1, 2, "fast"):
        with pytest.raises(ClassforgeError, match="muon_lr"):
            classforge.train(tiny, tmp_path / "b", backbone="cnn_small", strategy="scratch", epochs=1,
                             optimizer="muon", optimizer_args={"muon_lr": bad})
    assert not (tmp_path / "b" / "model.safetensors").exists()
    r = subprocess.run([sys.executable, "-m", "classforge.cli", "train", str(tiny), "--backbone", "cnn_small",
                        "--strategy", "scratch", "--epochs", "1", "--out", str(tmp_path / "c"), "--optimizer", "lion"],
                       capture_output=True, text=True, timeout=300)
    said = " ".join((r.stderr + r.stdout).split())
    assert r.returncode != 0 and "--optimizer must be auto or one of adamw, sgd" in said and "Traceback" not in said


# ------------------------------------------------------------------------------------------------ allocator
_MMAP_PROBE = """
import ctypes, json, sys, torch
sys.path.insert(0, {cifar!r})
from sysalloc import keep_freed_memory
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                              "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
kept = keep_freed_memory()
t = torch.empty(20 * 1024 * 1024, dtype=torch.uint8)  # 20 MB, the size of a CIFAR batch's activation
print(json.dumps({"kept": kept, "mmapped": libc.mallinfo2().hblkhd}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator settings are Linux-only")
def test_training_keeps_big_tensors_off_fresh_mmap_pages():
    """With classforge's allocator settings a 20 MB tensor comes from the heap (reused after free), not from a
    fresh mmap() that is unmapped again at every training step; CLASSFORGE_MALLOC=system leaves glibc's default."""
    def probe(env):
        probe_code = _MMAP_PROBE.replace("{cifar!r}", repr(str(CIFAR10)))
        r = subprocess.run([sys.executable, "-c", probe_code], capture_output=True, text=True, timeout=120,
                           env={**os.environ, **env})
        if "mallinfo2" in r.stderr:
            pytest.skip("this libc has no mallinfo2 (glibc < 2.33)")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout.strip().splitlines()[-1])

    tuned, default = probe({"CLASSFORGE_MALLOC": ""}), probe({"CLASSFORGE_MALLOC": "system"})
    assert tuned["kept"] is True and tuned["mmapped"] < 20 * 1024 * 1024
    assert default["kept"] is False and default["mmapped"] >= 20 * 1024 * 1024
