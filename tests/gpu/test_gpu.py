"""The GPU paths, end to end, on a CUDA device (skipped without one; benchmarks/gpu_check.sh runs them): extraction
on the GPU, mixed-precision training of every network strategy, DDP on one device, predict, serve and export of a
GPU-trained run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import requests
import torch
from conftest import ServerThread, make_image_folder

import classforge
from classforge.api import predict_files
from classforge.models.registry import create_backbone
from classforge.runtime.engines import Engine
from classforge.runtime.predictor import Predictor

pytestmark = [pytest.mark.gpu, pytest.mark.trains]


@pytest.fixture(scope="module")
def gpu_data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("gpu") / "d", 16, kinds=("circle", "stripes"))


@pytest.fixture(scope="module")
def gpu_finetune(gpu_data, tmp_path_factory):
    """A fine-tune trained on the GPU, shared by the predict, serve and export tests."""
    return classforge.train(gpu_data, tmp_path_factory.mktemp("gpu") / "ft", strategy="finetune", epochs=2,
                            batch_size=8, accelerator="gpu")


def summary(run) -> dict:
    return json.loads((run / "summary.json").read_text())


def test_the_gpu_extraction_engine_gives_the_fp32_features(tmp_path):
    bb = create_backbone("efficientnet_lite0", pretrained=True)
    x = torch.rand(6, 3, bb.spec.size, bb.spec.size)
    with torch.inference_mode():
        want = bb.eval()(x).float()
    engine = Engine("torch", "cuda:0")
    got = engine.build(bb, tmp_path)(x.pin_memory()).cpu()
    cos = torch.nn.functional.cosine_similarity(got, want, dim=1)
    assert engine.key == "torch-fp16-cuda" and not engine.exact
    assert float(cos.min()) >= 0.99


def test_a_linear_run_embeds_on_the_gpu(gpu_data, tmp_path):
    run = classforge.train(gpu_data, tmp_path / "lin", accelerator="gpu")
    s = summary(run)
    assert s["embeddings"]["engine"] == "torch-fp16-cuda" and s["test"]["accuracy"] >= 0.8


@pytest.mark.parametrize("strategy,backbone", [("finetune", "efficientnet_lite0"), ("two-stage", "efficientnet_lite0"),
                                               ("scratch", "cnn_small")])
def test_every_network_strategy_trains_in_mixed_precision(gpu_data, tmp_path, strategy, backbone):
    run = classforge.train(gpu_data, tmp_path / strategy, strategy=strategy, backbone=backbone, epochs=2,
                           batch_size=8, accelerator="gpu")
    t = summary(run)["trainer"]
    assert t["accelerator"] == "CUDAAccelerator" and "mixed" in t["precision"], t


def test_ddp_on_one_gpu(gpu_data, tmp_path):
    run = classforge.train(gpu_data, tmp_path / "ddp", strategy="finetune", epochs=1, batch_size=8,
                           accelerator="gpu", devices=1, dist_strategy="ddp")
    t = summary(run)["trainer"]
    assert t["strategy"] == "DDPStrategy" and t["world_size"] == 1


def test_predict_on_the_gpu_agrees_with_the_cpu(gpu_finetune, gpu_data):
    files = sorted(str(p) for p in gpu_data.rglob("*.png"))[:12]
    cpu = Predictor.from_run(gpu_finetune, backend="torch").predict_proba(files)
    gpu = Predictor.from_run(gpu_finetune, backend="torch", device="cuda").predict_proba(files)
    assert np.allclose(cpu, gpu, atol=2e-3)
    results = predict_files(gpu_finetune, files[:2], device="cuda")
    assert all("label" in r for r in results)


@pytest.mark.server
def test_serve_on_the_gpu(gpu_finetune, gpu_data):
    from classforge.serve.api import create_app

    f = sorted(gpu_data.rglob("*.png"))[0]
    with ServerThread(create_app(gpu_finetune, device="cuda", ui=False)) as server:
        assert requests.get(server.url + "/health", timeout=10).json()["backend"] == "torch"
        r = requests.post(server.url + "/predict", files={"file": (f.name, f.read_bytes(), "image/png")}, timeout=60)
        assert r.status_code == 200 and r.json()["results"][0]["label"] in ("circle", "stripes")


def test_export_of_a_gpu_trained_run(gpu_finetune, gpu_data):
    classforge.export(gpu_finetune)
    files = sorted(str(p) for p in gpu_data.rglob("*.png"))[:8]
    onnx = Predictor.from_run(gpu_finetune, backend="onnx").predict_proba(files)
    torch_cpu = Predictor.from_run(gpu_finetune, backend="torch").predict_proba(files)
    assert np.allclose(onnx, torch_cpu, atol=1e-4)
