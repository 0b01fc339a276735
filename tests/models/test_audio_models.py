"""Audio backbones: the EfficientAT port against the AudioSet probe sounds, the conv-STFT front ends against
trusted references (torch.stft, transformers' Kaldi filters and AST feature extractor), ONNX Runtime parity,
and fast, clear failures offline."""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from classforge.core.errors import ClassforgeError
from classforge.data.audio import load_audio
from classforge.models import audio as A
from classforge.models.registry import create_backbone, registered
from classforge.models.weights import sha256_file

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
MN04 = SHARED / "weights" / "mn04_as_mAP_432.pt"
needs_shared = pytest.mark.skipif(not MN04.is_file(), reason=f"{MN04} absent (shared test data not mounted)")


@pytest.fixture(scope="module")
def mn04():
    if not MN04.is_file():
        pytest.skip(f"{MN04} absent (shared test data not mounted)")
    return create_backbone("efficientat_mn04", weights=str(MN04)).eval()


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CLASSFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CLASSFORGE_MN04_WEIGHTS", raising=False)


@needs_shared
def test_shared_weights_are_the_official_file():
    assert sha256_file(MN04) == A.MN04_SHA256


@needs_shared
@pytest.mark.parametrize("sound, expected", [
    ("Front_Center.wav", {"Speech"}),
    ("Noise.wav", {"Pink noise", "White noise", "Noise"}),
    ("alarm-clock-elapsed.oga", {"Alarm"}),
])
def test_probe_sounds_top5(mn04, sound, expected):
    with open(SHARED / "weights" / "audioset_class_labels_indices.csv", newline="") as f:
        names = [r["display_name"] for r in csv.DictReader(f)]
    wave = torch.from_numpy(load_audio(SHARED / "probe" / "sounds" / sound, 32000))[None]  # the full clip
    with torch.no_grad():
        probs = torch.sigmoid(mn04.audioset_logits(wave))[0]
    top = probs.topk(5)
    top5 = [(names[i], round(float(p), 3)) for p, i in zip(top.values, top.indices)]
    print(sound, top5)
    assert expected & {n for n, _ in top5}, top5


def test_frontend_matches_torch_stft():
    """The conv1d DFT equals the reference pipeline written with torch.stft (pre-emphasis, centred STFT,
    Kaldi mel, log(x + 1e-5), (x + 4.5) / 5)."""
    model = A.EfficientATBackbone()
    wave = torch.randn(2, 20000) * 0.1
    x = wave[:, 1:] - 0.97 * wave[:, :-1]
    power = torch.stft(x, 1024, hop_length=320, win_length=800, window=torch.hann_window(800, periodic=False),
                       center=True, return_complex=True).abs() ** 2
    mel = A.kaldi_mel_banks(128, 1024, 32000, 0.0, 15000.0)
    ref = (torch.log(mel @ power + 1e-5) + 4.5) / 5.0
    assert (model.log_mel(wave) - ref).abs().max() < 1e-4


@pytest.mark.parametrize("name", ["efficientat_mn04", "audio_cnn", "ast"])
def test_fft_frontend_equals_the_exported_conv(name, monkeypatch):
    """PyTorch computes the power spectrum by FFT, an export traces the conv DFT: both give the same log-mel
    (centred windows with an offset, and AST's Kaldi frames with DC removal and pre-emphasis)."""
    kw = {"tiny": True} if name == "ast" else {}
    frontend = next(m for m in create_backbone(name, pretrained=False, **kw).modules() if isinstance(m, A.LogMel))
    wave = torch.randn(3, 16000) * 0.1
    wave[1, :4000] = 0.0  # silence: log of the smallest energies
    with torch.no_grad():
        fft = frontend(wave)
        monkeypatch.setattr(A, "_exporting", lambda: True)
        conv = frontend(wave)
    assert fft.shape == conv.shape
    assert (fft - conv).abs().max() < 1e-2 and (fft - conv).abs().mean() < 1e-4


@pytest.mark.filterwarnings("ignore:At least one mel filter")  # AST's lowest filters are narrower than a bin
def test_mel_banks_match_transformers_kaldi():
    audio_utils = pytest.importorskip("transformers.audio_utils")
    ref = audio_utils.mel_filter_bank(num_frequency_bins=257, num_mel_filters=128, min_frequency=20,
                                      max_frequency=8000, sampling_rate=16000, norm=None, mel_scale="kaldi",
                                      triangularize_in_mel_space=True).T
    assert np.abs(A.kaldi_mel_banks(128, 512, 16000, 20.0, 8000.0).numpy() - ref).max() < 1e-6


@pytest.mark.filterwarnings("ignore:At least one mel filter")
def test_ast_fbank_matches_feature_extractor():
    transformers = pytest.importorskip("transformers")
    fe = transformers.ASTFeatureExtractor(max_length=200)
    backbone = create_backbone("ast", pretrained=False, tiny=True, max_length=200)
    wave = (np.random.default_rng(0).normal(0, 0.1, 24000)).astype(np.float32)  # 1.5 s: padded to 200 frames
    ref = fe(wave, sampling_rate=16000, return_tensors="pt")["input_values"]
    diff = (backbone.fbank(torch.from_numpy(wave)[None]) - ref).abs()
    # float32 against the extractor's float64: a few values of the quietest mel band differ by up to ~1e-4 (how
    # far depends on the CPU's FFT path); a wrong window, scale or frame is off everywhere, by far more
    assert diff.max() < 3e-4 and diff.mean() < 1e-6


def test_registry_shapes_and_param_groups():
    reg = registered()
    assert {reg[n].task for n in ("efficientat_mn04", "audio_cnn", "ast")} == {"audio"}
    for name, dim, rate in (("efficientat_mn04", 384, 32000), ("audio_cnn", 128, 16000)):
        model = create_backbone(name, pretrained=False, clip_seconds=0.5).eval()
        assert (model.feature_dim, model.spec.sample_rate, model.spec.clip_seconds) == (dim, rate, 0.5)
        with torch.no_grad():
            assert model(torch.randn(3, rate // 2) * 0.1).shape == (3, dim)
        groups = model.param_groups()
        assert len(groups) >= 3 and sorted(id(p) for g in groups for p in g) == sorted(id(p) for p in model.parameters())


def test_spec_augment_inside_backbone_only_when_training():
    torch.manual_seed(0)
    model = create_backbone("audio_cnn", pretrained=False, spec_augment=True)
    wave = torch.randn(2, 16000) * 0.1
    plain = create_backbone("audio_cnn", pretrained=False)
    plain.load_state_dict(model.state_dict())  # same weights: SpecAugment adds no state
    with torch.no_grad():
        assert torch.equal(model.eval()(wave), plain.eval()(wave))
        model.train(), plain.train()
        assert not torch.allclose(model(wave), plain(wave))


def test_frontend_stays_float32_under_bf16_autocast():
    model = A.EfficientATBackbone().eval()
    wave = torch.randn(1, 16000) * 0.1
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        mel = model.log_mel(wave)
    assert mel.dtype == torch.float32 and torch.allclose(mel, model.log_mel(wave), atol=1e-5)


@pytest.mark.filterwarnings("ignore:Constant folding")  # the TorchScript exporter's note on sliced inputs
def test_onnx_parity_mn04(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = (create_backbone("efficientat_mn04", weights=str(MN04)) if MN04.is_file()
             else create_backbone("efficientat_mn04", pretrained=False)).eval()
    path = tmp_path / "mn04.onnx"
    torch.onnx.export(model, (torch.randn(2, 32000) * 0.1,), str(path), input_names=["wave"],
                      output_names=["features"], opset_version=17, dynamo=False,
                      dynamic_axes={"wave": {0: "batch", 1: "time"}, "features": {0: "batch"}})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in ((2, 32000), (3, 41000)):  # batch and clip length are both free
        wave = torch.randn(*shape) * 0.1
        with torch.no_grad():
            ref = model(wave).numpy()
        out = session.run(None, {"wave": wave.numpy()})[0]
        assert np.abs(out - ref).max() <= 1e-4


@needs_shared
def test_mn04_user_checkpoint_that_differs_warns_and_loads(tmp_path, mn04):
    from safetensors.torch import save_file

    tuned = {f"backbone.{k}": v.clone() + 0.01 for k, v in mn04.state_dict().items() if v.is_floating_point()}
    save_file(tuned, tmp_path / "model.safetensors")
    with pytest.warns(UserWarning, match="differs from the official"):
        model = create_backbone("efficientat_mn04", weights=str(tmp_path / "model.safetensors"))
    first = "features.0.0.weight"
    assert torch.equal(model.state_dict()[first], tuned[f"backbone.{first}"])


def _simulate_offline_if_online(monkeypatch, host: str) -> None:
    # Tests never download: on a machine that can reach the host, use the documented offline switch.
    if A._reachable(host):
        monkeypatch.setenv("CLASSFORGE_OFFLINE", "1")


def test_mn04_without_weights_offline_fails_fast(monkeypatch):
    _simulate_offline_if_online(monkeypatch, "github.com")
    t0 = time.time()
    with pytest.raises(ClassforgeError, match="--weights PATH"):
        create_backbone("efficientat_mn04", pretrained=True)
    assert time.time() - t0 < 3


def test_ast_tiny_offline_and_save_pretrained_roundtrip(tmp_path):
    pytest.importorskip("transformers")
    backbone = create_backbone("ast", pretrained=False, tiny=True).eval()
    wave = torch.randn(2, 16000) * 0.1
    with torch.no_grad():
        feats = backbone(wave)
    assert feats.shape == (2, backbone.feature_dim) and torch.isfinite(feats).all()
    backbone.model.save_pretrained(tmp_path / "ast_tiny")
    again = create_backbone("ast", weights=str(tmp_path / "ast_tiny")).eval()
    with torch.no_grad():
        assert torch.allclose(again(wave), feats, atol=1e-5)


def test_ast_pretrained_offline_fails_fast(monkeypatch):
    pytest.importorskip("transformers")
    if os.environ.get("HF_HUB_OFFLINE") != "1":
        _simulate_offline_if_online(monkeypatch, "huggingface.co")
    t0 = time.time()
    with pytest.raises(ClassforgeError, match="--weights"):
        create_backbone("ast", pretrained=True)
    assert time.time() - t0 < 3


def test_clip_mean_norm_removes_recording_level():
    """audio_cnn with clip_norm (either mode): the same recording 6 dB quieter gives (nearly) the same features;
    without it the features move. Padding frames do not leak the level either."""
    torch.manual_seed(0)
    wave = torch.zeros(2, 16000)
    wave[:, 4000:12000] = torch.randn(2, 8000) * 0.3
    for clip_norm, moves in (("mel", False), (True, False), ("level", False), (False, True)):
        torch.manual_seed(1)
        b = create_backbone("audio_cnn", clip_norm=clip_norm)
        b.norm.running_mean.fill_(-5.0)  # as after training: a fixed per-bin offset, not the batch's statistics
        b.eval()
        with torch.no_grad():
            loud, quiet = b(wave), b(0.5 * wave)
        rel = float((loud - quiet).abs().max() / loud.abs().max())
        assert (rel > 0.01) == moves, (clip_norm, rel)  # measured: ~3e-4 with, 0.05-0.11 without


def test_clip_norm_level_mode_keeps_a_steady_spectrum():
    """Per-bin ("mel") normalisation flattens a stationary sound: a steady 300 Hz and a steady 3 kHz tone become
    the same; "level" keeps their different spectra and still ignores the level."""
    from classforge.models.audio import ClipMeanNorm

    t = torch.arange(16000) / 16000
    tones = torch.stack([torch.sin(2 * torch.pi * 300 * t), torch.sin(2 * torch.pi * 3000 * t)]) * 0.3
    b = create_backbone("audio_cnn")
    mels = b.frontend(tones)
    for mode, differ in (("mel", False), ("level", True)):
        norm = ClipMeanNorm(float(np.log(1e-6)), mode)
        a, c = norm(mels)
        assert (float((a - c).abs().mean()) > 1.0) == differ, mode
        assert torch.allclose(norm(mels + 2.5), norm(mels), atol=1e-4)  # a 2.5 (log) level step is removed
    with pytest.raises(ClassforgeError, match="clip_norm"):
        create_backbone("audio_cnn", clip_norm="bins")
