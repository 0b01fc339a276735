"""ONNX export: parity with eager fp32 PyTorch on real files, free batch axis, int8, model card, Predictor backend."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import shared_path

import classforge
import classforge.runtime.predictor
from classforge.core.errors import ClassforgeError
from classforge.data.rundata import run_files
from classforge.deploy.modelcard import push, write_model_card
from classforge.deploy.onnx import export_run
from classforge.models.registry import Classifier, create_backbone
from classforge.runtime.onnx import TOLERANCE
from classforge.runtime.predictor import load_run_model

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


@pytest.fixture(scope="session")
def sane_run(linear_run, tmp_path_factory) -> Path:
    """linear_run's data and split with a head fitted by scikit-learn's logistic regression on the pretrained
    backbone's features: a trained model whose logits have ordinary size, exported with int8."""
    from sklearn.linear_model import LogisticRegression

    from classforge.core.config import TrainConfig
    from classforge.training.flow import save_model

    run = tmp_path_factory.mktemp("sane") / "run"
    run.mkdir()
    for f in ("split.csv", "summary.json", "config.yaml"):
        shutil.copy(linear_run / f, run / f)
    labels = json.loads((linear_run / "labels.json").read_text())
    torch.manual_seed(0)
    model = Classifier(create_backbone("efficientnet_lite0", pretrained=True), len(labels)).eval()
    p = classforge.runtime.predictor.Predictor(model, model.backbone.spec, labels, fast=False)
    train = run_files(run, ("train",))
    with torch.inference_mode():
        feats = model.backbone(torch.stack([p.preprocess(f) for f, _, _ in train])).numpy()
    clf = LogisticRegression(C=1.0, max_iter=2000).fit(feats, [labels.index(c) for _, c, _ in train])
    with torch.no_grad():
        model.head.weight.copy_(torch.from_numpy(clf.coef_).float())
        model.head.bias.copy_(torch.from_numpy(clf.intercept_).float())
    save_model(run, model, TrainConfig.load(run / "config.yaml"), labels)
    export_run(run, quantize="int8")
    return run


def make_run(run: Path, model: Classifier, backbone: str, labels: list[str], root: Path, files: list[Path],
             **backbone_args) -> Path:
    """A run directory around an untrained head: enough for export (model files + split.csv over real files)."""
    from classforge.core.config import TrainConfig
    from classforge.training.flow import save_model

    run.mkdir(parents=True, exist_ok=True)
    cfg = TrainConfig().replace(backbone=backbone, data=str(root), backbone_args=backbone_args)
    save_model(run, model, cfg, labels)
    with open(run / "split.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split", "group"])
        for i, p in enumerate(files):
            w.writerow([p.relative_to(root).as_posix(), p.parent.name, "test", f"#{i}"])
    (run / "summary.json").write_text(json.dumps({"task": model.backbone.spec.task, "backbone": backbone,
                                                  "strategy": "linear", "data": str(root)}))
    return run


def check_onnx_file(run: Path, report: dict, n: int = 32, strict: bool = True) -> None:
    """strict: max |Δlogit| <= 1e-4 whatever the logits; else the bound may grow with a huge logit scale."""
    p = report["parity"]
    assert p["n"] == n and p["source"].startswith("real files"), p
    assert p["passed"] and p["top1_agreement"] == 1.0, p
    assert p["max_abs_diff"] <= TOLERANCE * (1 if strict else p["scale"]), p
    m = onnx.load(str(run / "model.onnx"))
    assert {o.domain: o.version for o in m.opset_import}[""] == 17
    meta = {kv.key: kv.value for kv in m.metadata_props}
    assert json.loads(meta["classforge.labels"]) == json.loads((run / "labels.json").read_text())
    assert json.loads((run / "export.json").read_text())["parity"] == p


def test_export_parity_on_32_real_images(exported_run):
    report = json.loads((exported_run / "export.json").read_text())
    # A trained head may produce logits far beyond ±10; float32 cannot then hold 1e-4 (export.json says so).
    check_onnx_file(exported_run, report, strict=report["parity"]["max_abs_logit"] <= 10)
    assert report["input"]["shape"][0] == "batch" and report["input"]["shape"][1:] == [3, 224, 224]
    # The batch axis is free: batch 1 and 5 give the rows of batch 6, and PyTorch's logits.
    model, _, _ = load_run_model(exported_run)
    p = classforge.load(exported_run, backend="torch")
    files = [f for f, _, _ in run_files(exported_run, ("test", "val"))][:6]
    x = torch.stack([p.preprocess(f) for f in files])
    s = ort.InferenceSession(str(exported_run / "model.onnx"), providers=["CPUExecutionProvider"])
    whole = s.run(None, {"input": x.numpy()})[0]
    parts = np.concatenate([s.run(None, {"input": x[:1].numpy()})[0], s.run(None, {"input": x[1:].numpy()})[0]])
    with torch.inference_mode():
        ref = model(x).numpy()
    # the bound from this test's own reference logits, not from the exporter's report
    bound = TOLERANCE * max(1.0, float(np.abs(ref).max()) / 10)
    assert np.abs(whole - parts).max() <= bound and np.abs(whole - ref).max() <= bound


def test_export_parity_strict_on_32_real_images(sane_run):
    """A trained head with logits of ordinary size: max |Δlogit| <= 1e-4 on 32 of the run's real files."""
    report = json.loads((sane_run / "export.json").read_text())
    check_onnx_file(sane_run, report)
    assert report["parity"]["max_abs_logit"] <= 10


def test_int8_quantization_reports_agreement(sane_run, exported_run):
    q = json.loads((sane_run / "export.json").read_text())["int8"]
    assert (sane_run / "model.int8.onnx").is_file() and q["method"] == "static" and q["calibration_files"] > 0
    assert q["bytes"] < 0.5 * (sane_run / "model.onnx").stat().st_size
    assert q["n"] == 32 and q["top1_agreement"] >= 0.9  # three visually obvious classes
    p = classforge.load(sane_run, backend="int8")
    assert p.backend == "onnxruntime" and p.onnx_path.name == "model.int8.onnx"
    files = [str(f) for f, _, _ in run_files(sane_run, ("test",))]
    fp32 = classforge.load(sane_run).predict_proba(files)
    assert (p.predict_proba(files).argmax(1) == fp32.argmax(1)).mean() >= 0.8
    # every export with --quantize reports the agreement, whatever the head: the int8 and fp32 files' top-1
    # agreement on the same real inputs, recomputed here
    from classforge.runtime.export import parity_inputs
    from classforge.runtime.predictor import Predictor

    reported = json.loads((exported_run / "export.json").read_text())["int8"]
    ref = classforge.load(exported_run, backend="torch")
    x, _ = parity_inputs(exported_run, Predictor(ref.model, ref.spec, ref.labels, fast=False), reported["n"])
    runs = [ort.InferenceSession(str(exported_run / name), providers=["CPUExecutionProvider"]).run(
        None, {"input": x.numpy()})[0] for name in ("model.onnx", "model.int8.onnx")]
    assert reported["top1_agreement"] == pytest.approx(float((runs[0].argmax(1) == runs[1].argmax(1)).mean()))


def test_predictor_prefers_onnx_and_agrees_with_torch(exported_run):
    files = [str(f) for f, _, _ in run_files(exported_run, ("test",))]
    fast, slow = classforge.load(exported_run), classforge.load(exported_run, backend="torch")
    assert fast.backend == "onnxruntime" and slow.backend == "torch"
    a, b = fast.predict_proba(files), slow.predict_proba(files)  # both fp32: the same probabilities
    assert (a.argmax(1) == b.argmax(1)).all() and np.abs(a - b).max() < 1e-3


def test_model_card_front_matter(exported_run):
    from huggingface_hub import ModelCard

    card = ModelCard.load(exported_run / "README.md")
    assert card.data.library_name == "classforge" and card.data.pipeline_tag == "image-classification"
    assert "onnx" in card.data.tags and "efficientnet_lite0" in card.data.tags
    s = json.loads((exported_run / "summary.json").read_text())
    acc = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert acc["accuracy"] == round(s["test"]["accuracy"], 4) and acc["f1"] == round(s["test"]["macro_f1"], 4)
    for section in ("## Data", "## Metrics", "## Intended use", "## Limitations", "### ONNX"):
        assert section in card.text
    assert str(s["data"]) not in card.content  # the card names the data folder, not a local path
    # classforge is not on PyPI: the install line names the extra and says where the package comes from
    assert 'pip install "classforge[serve]"' in card.text and "wheel or source checkout" in card.text
    # callable alone, with a licence
    out = write_model_card(exported_run, license="apache-2.0")
    assert ModelCard.load(out).data.license == "apache-2.0"


def test_push_offline_fails_fast(exported_run, monkeypatch):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.time()
    with pytest.raises(ClassforgeError, match="cannot reach huggingface.co"):
        push(exported_run, "someone/model")
    assert time.time() - t < 2


def test_export_without_data_says_random(tmp_path):
    """No data files on this machine: parity still runs, on random tensors, and export.json says so."""
    torch.manual_seed(0)
    model = Classifier(create_backbone("audio_cnn", clip_seconds=0.5), 3).eval()
    run = make_run(tmp_path / "run", model, "audio_cnn", ["a", "b", "c"], tmp_path / "gone", [], clip_seconds=0.5)
    r = export_run(run, n_parity=4, model_card=False)
    assert r["parity"]["source"].startswith("random") and r["parity"]["passed"] and r["parity"]["n"] == 4
    assert r["input"]["shape"] == ["batch", 8000]
    assert not (run / "README.md").exists()


def test_export_rejects_unknown_options(exported_run):
    with pytest.raises(ClassforgeError, match="only onnx"):
        export_run(exported_run, format="tflite")
    with pytest.raises(ClassforgeError, match="--quantize"):
        export_run(exported_run, quantize="int4")


@pytest.mark.slow
def test_export_parity_hymenoptera_photos(tmp_path):
    """32 real photos (ImageNet-sized JPEGs) through the pretrained EfficientNet-Lite0 with a fresh head."""
    root = shared_path("datasets", "hymenoptera")
    files = sorted((root / "val").rglob("*.jpg"))[::4][:32]
    torch.manual_seed(0)
    model = Classifier(create_backbone("efficientnet_lite0", pretrained=True), 2).eval()
    run = make_run(tmp_path / "run", model, "efficientnet_lite0", ["ants", "bees"], root, files)
    r = export_run(run, model_card=False)
    check_onnx_file(run, r)


@pytest.mark.slow
def test_export_parity_32_real_clips_mn04(tmp_path):
    """32 real spoken-digit clips (8 kHz, resampled to 32 kHz) through the AudioSet-pretrained mn04 and its
    conv-STFT log-mel front end."""
    root = shared_path("datasets", "fsdd")
    weights = shared_path("weights", "mn04_as_mAP_432.pt")
    files = sorted((root / "test").rglob("*.wav"))[::9][:32]
    torch.manual_seed(0)
    model = Classifier(create_backbone("efficientat_mn04", weights=str(weights)), 10).eval()
    labels = sorted(d.name for d in (root / "test").iterdir() if d.is_dir())
    run = make_run(tmp_path / "run", model, "efficientat_mn04", labels, root, files)
    r = export_run(run, model_card=False)
    check_onnx_file(run, r)
    assert r["task"] == "audio" and r["input"]["shape"][0] == "batch"


def test_export_parity_gelu_squeeze_excite_cnn_on_cifar10_images(tmp_path):
    """The CIFAR-10 recipe's net (cnn_plain_256k with block=plainpool, act=gelu, se=8 and flip TTA inside the model)
    exports to ONNX (GELU as Erf, the gates as GlobalAveragePool + 1x1 convs + Sigmoid + Mul) and ONNX Runtime gives
    PyTorch's logits on 32 real CIFAR-10 test images, after its BN statistics and gates moved away from their
    initial values."""
    root = shared_path("datasets", "cifar10")
    files = [p for c in sorted((root / "test").iterdir()) for p in sorted(c.glob("*"))[:4]][:32]
    args = dict(block="plainpool", act="gelu", se=8, tta="flip")
    torch.manual_seed(0)
    model = Classifier(create_backbone("cnn_plain_256k", pretrained=False, **args), 10)
    model.train()
    with torch.no_grad():  # a few batches in train mode: non-trivial running BN statistics
        for _ in range(3):
            model(torch.randn(16, 3, 32, 32) * 2 + 0.5)
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d) and m.bias is not None:
                m.bias.normal_(0, 0.5)  # the gates' biases: per-channel weights away from sigmoid(0)
    model.eval()
    labels = sorted(c.name for c in (root / "test").iterdir())
    run = make_run(tmp_path / "run", model, "cnn_plain_256k", labels, root, files, **args)
    r = export_run(run, model_card=False)
    check_onnx_file(run, r)
    ops = {n.op_type for n in onnx.load(str(run / "model.onnx")).graph.node}
    assert {"Erf", "Sigmoid", "GlobalAveragePool", "Mul"} <= ops, ops
