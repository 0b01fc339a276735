"""Audio through the whole flow: real WAV/OGG files written here, bad ones included."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import SHARED, tree_checksums

import classforge
from classforge.core.errors import BadFile, ClassforgeError

MN04 = SHARED / "weights" / "mn04_as_mAP_432.pt"


def _tone(rng, kind: str, sr: int, seconds: float) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    if kind == "low":
        f = rng.uniform(180, 400)
        y = np.sin(2 * np.pi * f * t)
    elif kind == "high":
        f = rng.uniform(1800, 3200)
        y = np.sin(2 * np.pi * f * t) * (0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(2, 6) * t))
    else:
        y = rng.normal(0, 0.4, len(t))
    return (0.5 * y / max(1e-6, np.abs(y).max())).astype(np.float32)


@pytest.fixture(scope="module")
def sounds(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sounds")
    rng = np.random.default_rng(0)
    for kind in ("low", "high", "noise"):
        (root / kind).mkdir()
        for i in range(14):
            sr = int(rng.choice([16000, 22050, 32000]))
            sf.write(root / kind / f"{kind}_{i:02d}.wav", _tone(rng, kind, sr, rng.uniform(0.6, 1.4)), sr)
    # the awkward ones
    sf.write(root / "low" / "zero_length.wav", np.zeros(0, np.float32), 16000)
    sf.write(root / "low" / "silent.wav", np.zeros(16000, np.float32), 16000)
    stereo = np.stack([_tone(rng, "high", 44100, 1.0), _tone(rng, "high", 44100, 1.0)], 1)
    sf.write(root / "high" / "stereo_44k.wav", stereo, 44100)
    sf.write(root / "noise" / "eight_bit.wav", _tone(rng, "noise", 8000, 1.0), 8000, subtype="PCM_U8")
    sf.write(root / "noise" / "good.ogg", _tone(rng, "noise", 16000, 1.0), 16000, format="OGG", subtype="VORBIS")
    ogg = (root / "noise" / "good.ogg").read_bytes()
    (root / "noise" / "corrupt.ogg").write_bytes(ogg[:40] + b"\x00" * 200)
    return root


@pytest.fixture(scope="module")
def audio_run(sounds, tmp_path_factory) -> Path:
    before = tree_checksums(sounds)
    run = classforge.train(sounds, tmp_path_factory.mktemp("arun") / "cnn", backbone="audio_cnn",
                           strategy="scratch", epochs=12, batch_size=8, seed=1)
    assert tree_checksums(sounds) == before  # user data untouched
    return run


def test_audio_run_reports_skipped_files(audio_run):
    s = json.loads((audio_run / "summary.json").read_text())
    assert s["task"] == "audio" and s["backbone"] == "audio_cnn" and s["classes"] == 3
    html = (audio_run / "report.html").read_text()
    for name, why in [("zero_length.wav", "no audio"), ("silent.wav", "silent"), ("corrupt.ogg", "cannot decode")]:
        assert name in html and why in html
    with open(audio_run / "split.csv") as f:
        kept = {Path(r["path"]).name for r in csv.DictReader(f)}
    assert {"stereo_44k.wav", "eight_bit.wav", "good.ogg"} <= kept  # awkward but valid: used
    assert "zero_length.wav" not in kept and "silent.wav" not in kept and "corrupt.ogg" not in kept
    assert s["test"]["accuracy"] >= 0.6, s["test"]


def test_audio_cnn_run_saves_its_clip_norm(audio_run):
    """audio_cnn trains with per-clip level normalisation by default, and says so in model.json: a run saved
    without the key (before the default) rebuilds without it, so old runs keep their own front end."""
    from classforge.models.audio import ClipMeanNorm
    from classforge.runtime.predictor import build_model, load_run_model

    model, meta, _ = load_run_model(audio_run)
    assert meta["backbone_kwargs"]["clip_norm"] == "level"
    assert isinstance(model.backbone.clip_norm, ClipMeanNorm)
    old = {**meta, "backbone_kwargs": {k: v for k, v in meta["backbone_kwargs"].items() if k != "clip_norm"}}
    assert not isinstance(build_model(old).backbone.clip_norm, ClipMeanNorm)


def test_audio_predict_matches_evaluation(audio_run, sounds):
    with open(audio_run / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    files = [str(sounds / r["path"]) for r in rows[:4]]
    out = subprocess.run([sys.executable, "-m", "classforge.cli", "predict", str(audio_run), *files, "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    for r, p in zip(rows, json.loads(out.stdout)):
        assert p["label"] == r["predicted"] and abs(p["probability"] - float(r["probability"])) < 1e-4


def test_predict_takes_waveforms_with_their_rate(audio_run, sounds):
    """(waveform, sample_rate) pairs, numpy or torch, mono or stereo, at any rate: the same answer as the file."""
    import torch

    p = classforge.load(audio_run)
    path = sounds / "high" / "stereo_44k.wav"
    want = p.predict(str(path))
    wave, rate = sf.read(path, dtype="float32")  # (T, 2) at 44.1 kHz
    for name, x in {"numpy stereo": (wave, rate), "torch (C, T)": (torch.from_numpy(wave.T.copy()), rate),
                    "numpy mono": (wave.mean(1), rate)}.items():
        got = p.predict(x)
        assert got["label"] == want["label"] and abs(got["probability"] - want["probability"]) < 1e-3, name
    with pytest.raises(BadFile, match="sample rate"):
        p.predict(wave.mean(1))  # a bare waveform: its rate cannot be guessed


def test_audio_report_has_players(audio_run):
    """One player per mistake shown (the 12 most confident); with no mistakes, none and the report says so."""
    html = (audio_run / "report.html").read_text()
    with open(audio_run / "predictions.csv") as f:
        wrong = sum(r["predicted"] != r["true"] for r in csv.DictReader(f))
    assert html.count("<audio controls") == min(12, wrong)
    assert ("No mistakes." in html) == (wrong == 0)


def test_augment_to_variants_inherit_the_training_split(sounds, tmp_path):
    run = classforge.train(sounds, tmp_path / "aug", backbone="audio_cnn", strategy="scratch", epochs=2,
                           augment_to=3, batch_size=8)
    s = json.loads((run / "summary.json").read_text())
    with open(run / "split.csv") as f:
        rows = list(csv.DictReader(f))
    train = [r for r in rows if r["split"] == "train"]
    assert len(train) > 0 and s["split"]["counts"]["test"] > 0
    # every variant is a training file, made from a training recording: none comes from a val/test recording
    variants = [r for r in rows if "#variant" in r["path"]]
    sources = {r["path"].split("#variant")[0] for r in variants}
    assert variants and all(r["split"] == "train" for r in variants)
    assert sources == {r["path"] for r in train if "#variant" not in r["path"]}
    assert "variants of" in (run / "report.html").read_text()
    cache = Path(os.environ["CLASSFORGE_CACHE"]) / "augmented"
    assert any(cache.rglob("*.wav"))
    assert not any(p.name.endswith("_v00.wav") for p in sounds.rglob("*"))  # nothing written into the data


@pytest.mark.skipif(not MN04.exists(), reason="mn04 AudioSet weights are in ../shared (development and CI only)")
def test_mn04_linear_default_on_tones(sounds, tmp_path, monkeypatch):
    monkeypatch.setenv("CLASSFORGE_MN04_WEIGHTS", str(MN04))
    run = classforge.train(sounds, tmp_path / "mn04", epochs=30)
    s = json.loads((run / "summary.json").read_text())
    assert s["backbone"] == "efficientat_mn04" and s["strategy"] == "linear"
    assert s["test"]["accuracy"] >= 0.8


def test_audio_finetune_uses_the_audio_recipe_unless_told_otherwise(sounds):
    """A pretrained audio backbone fine-tunes longer and harder than an image one (measured under-fitting with the
    image recipe); options the user gives win; from-scratch audio_cnn and linear are unaffected."""
    from classforge.core.config import TrainConfig
    from classforge.training.flow import resolve_for_data
    from classforge.training.prepared import prepare_data

    cfg = TrainConfig().replace(data=str(sounds), strategy="finetune")
    data = prepare_data(cfg)
    r = resolve_for_data(cfg, data)
    assert r.backbone == "efficientat_mn04"
    assert (r.epochs, float(r.lr), r.backbone_lr_mult) == (15, 3e-3, 0.3)
    mine = resolve_for_data(cfg.replace(epochs=4, lr="1e-4", backbone_lr_mult=0.05), data)
    assert (mine.epochs, mine.lr, mine.backbone_lr_mult) == (4, "1e-4", 0.05)
    for other in (cfg.replace(strategy="linear"), cfg.replace(strategy="scratch", backbone="audio_cnn")):
        o = resolve_for_data(other, data)
        assert (o.epochs, o.lr, o.backbone_lr_mult) == (0, "default", None)


def test_audio_mixup_trains_and_cutmix_is_refused(sounds, tmp_path):
    run = classforge.train(sounds, tmp_path / "mix", backbone="audio_cnn", strategy="scratch", epochs=2,
                           batch_size=8, mixup=0.4, patience=1000)
    assert json.loads((run / "summary.json").read_text())["trainer"]["mix"]["mixup"] == 0.4
    with pytest.raises(ClassforgeError, match="--cutmix pastes a box"):
        classforge.train(sounds, tmp_path / "cm", backbone="audio_cnn", strategy="scratch", epochs=1, cutmix=1.0)
