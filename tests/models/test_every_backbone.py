"""One test for every registered backbone, driven only by what each declares (no names in here): it is created
without downloads, runs forward on its own input spec, is described layer by layer, and exports to ONNX with
ONNX Runtime agreeing with PyTorch. A new backbone file is covered the moment it registers."""

from __future__ import annotations

import pytest
import torch

import classforge.models  # noqa: F401 - registers every family
from classforge.models.anatomy import describe
from classforge.models.registry import Classifier, create_backbone, registered
from classforge.runtime.onnx import TOLERANCE, ort_session, parity, run_ort, run_torch, torch_to_onnx

ENTRIES = registered()


def _example(spec, n: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if spec.task == "audio":
        return 0.1 * torch.randn(n, round(spec.sample_rate * spec.clip_seconds), generator=g)
    return torch.randn(n, spec.channels, spec.size, spec.size, generator=g)


def _small_model(entry) -> Classifier:
    kwargs = dict(entry.small_args)
    if entry.budget_aware:
        kwargs["num_classes"] = 3
    torch.manual_seed(0)
    return Classifier(create_backbone(entry.name, pretrained=False, **kwargs), 3).eval()


def test_registry_declares_one_default_per_task():
    defaults = [e for e in ENTRIES.values() if e.default_for]
    assert sorted(e.default_for for e in defaults) == ["audio", "image"]
    assert all(e.pretrained for e in defaults)


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_backbone_contract(name, tmp_path):
    entry = ENTRIES[name]
    model = _small_model(entry)
    bb = model.backbone
    assert bb.spec.task == entry.task
    assert bb.tta in bb.tta_modes and isinstance(bb.bf16_safe, bool)
    x = _example(bb.spec)
    with torch.inference_mode():
        feats, logits = bb(x), model(x)
    assert feats.shape == (2, bb.feature_dim) and logits.shape == (2, 3)
    assert torch.isfinite(logits).all()
    groups = bb.param_groups()
    assert sum(len(g) for g in groups) == len(list(bb.parameters()))
    anatomy = describe(model, tuple(x.shape[1:]))
    assert anatomy.totals["params"] == sum(p.numel() for p in model.parameters())
    path = tmp_path / "m.onnx"
    torch_to_onnx(model, x[:1], path)
    res = parity(run_torch(model, x), run_ort(ort_session(path), x), TOLERANCE)
    assert res["passed"], res
