"""Audio decoding, validation, clip fitting and augmentation on small generated files (real files, no mocks)."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from classforge.core.errors import BadFile
from classforge.core.spec import InputSpec
from classforge.data.audio import (
    AudioPreprocessor,
    augment_to_variants,
    fit_clip,
    inspect_audio,
    load_audio,
)
from classforge.models.audio import SpecAugment


def tone(sr: int, seconds: float, freq: float = 440.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CLASSFORGE_CACHE", str(tmp_path / "cache"))


def test_inspect_stereo_44k(tmp_path):
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([tone(44100, 1.5), tone(44100, 1.5, 880)], axis=1), 44100)
    info = inspect_audio(path)
    assert info == {"duration_s": pytest.approx(1.5), "sample_rate": 44100, "channels": 2, "frames": 66150,
                    "format": "WAV", "subtype": "PCM_16"}


def test_inspect_8bit_and_ogg(tmp_path):
    sf.write(tmp_path / "u8.wav", tone(8000, 1.0), 8000, subtype="PCM_U8")
    info = inspect_audio(tmp_path / "u8.wav")
    assert (info["subtype"], info["sample_rate"], info["frames"]) == ("PCM_U8", 8000, 8000)
    sf.write(tmp_path / "a.ogg", tone(16000, 1.0), 16000, format="OGG", subtype="VORBIS")
    info = inspect_audio(tmp_path / "a.ogg")
    assert (info["format"], info["channels"]) == ("OGG", 1)
    assert info["duration_s"] == pytest.approx(1.0, abs=0.01)


def _bad_files(tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, words the BadFile reason must contain)."""
    (tmp / "zero_bytes.wav").write_bytes(b"")
    sf.write(tmp / "no_frames.wav", np.zeros(0, np.float32), 16000)  # a valid header and nothing else
    sf.write(tmp / "silent.wav", np.zeros(16000, np.float32), 16000)
    sf.write(tmp / "full.wav", tone(16000, 2.0), 16000)
    (tmp / "cut.wav").write_bytes((tmp / "full.wav").read_bytes()[:1000])  # header claims 2 s, holds 30 ms
    sf.write(tmp / "full.ogg", tone(16000, 2.0), 16000, format="OGG", subtype="VORBIS")
    (tmp / "cut.ogg").write_bytes((tmp / "full.ogg").read_bytes()[:2000])
    (tmp / "noise.wav").write_bytes(np.random.default_rng(0).bytes(4000))  # not audio at all
    return {
        "zero_bytes": (tmp / "zero_bytes.wav", "empty file"),
        "no_frames": (tmp / "no_frames.wav", "0 frames"),
        "silent": (tmp / "silent.wav", "silent (peak amplitude"),
        "cut_wav": (tmp / "cut.wav", "truncated"),
        "cut_ogg": (tmp / "cut.ogg", "cannot decode audio"),
        "garbage": (tmp / "noise.wav", "cannot decode audio"),
    }


@pytest.mark.parametrize("name", ["zero_bytes", "no_frames", "silent", "cut_wav", "cut_ogg", "garbage"])
def test_bad_files_have_reasons(tmp_path, name):
    path, words = _bad_files(tmp_path)[name]
    for call in (lambda: inspect_audio(path), lambda: load_audio(path, 16000),
                 lambda: load_audio(path.read_bytes(), 16000)):
        with pytest.raises(BadFile) as e:
            call()
        assert words in str(e.value)
        assert len(str(e.value)) < 120 and "\n" not in str(e.value)  # a short sentence for a report row


def test_load_audio_mono_resampled(tmp_path):
    left, right = tone(44100, 1.5, 440, 0.5), np.zeros(66150, np.float32)
    sf.write(tmp_path / "s.wav", np.stack([left, right], axis=1), 44100, subtype="FLOAT")
    wave = load_audio(tmp_path / "s.wav", 32000)
    assert wave.dtype == np.float32 and wave.ndim == 1 and len(wave) == 48000
    assert np.abs(wave).max() == pytest.approx(0.25, rel=0.02)  # mean of a 0.5 tone and silence
    peak_hz = np.argmax(np.abs(np.fft.rfft(wave))) * 32000 / len(wave)
    assert peak_hz == pytest.approx(440, abs=1)  # the pitch survives resampling
    assert np.array_equal(wave, load_audio((tmp_path / "s.wav").read_bytes(), 32000))


def test_fit_clip():
    short = np.ones(10, np.float32)
    out = fit_clip(short, 16)
    assert len(out) == 16 and out[:3].sum() == 0 and out[3:13].sum() == 10 and out[13:].sum() == 0
    long = np.arange(100, dtype=np.float32)
    assert np.array_equal(fit_clip(long, 20), np.arange(40, 60))
    rng = np.random.default_rng(0)
    starts = {int(fit_clip(long, 20, "random", rng)[0]) for _ in range(50)}
    assert len(starts) > 10 and min(starts) >= 0 and max(starts) <= 80


def test_preprocessor_eval_and_train(tmp_path):
    spec = InputSpec(task="audio", size=0, channels=1, sample_rate=16000, clip_seconds=1.0)
    sf.write(tmp_path / "a.wav", tone(22050, 2.5), 22050)
    noise_dir = tmp_path / "battle_music"
    noise_dir.mkdir()
    sf.write(noise_dir / "n.ogg", np.random.default_rng(1).normal(0, 0.1, 44100).astype(np.float32), 44100,
             format="OGG", subtype="VORBIS")
    pre = AudioPreprocessor(spec, augment="strong", background_dir=str(noise_dir), seed=3)
    raw = pre.load(tmp_path / "a.wav")
    assert len(raw) == 40000
    ev = pre.eval(raw)
    assert ev.dtype == torch.float32 and ev.shape == (16000,)
    assert torch.equal(ev, pre.eval(raw))  # evaluation is deterministic
    crops = [pre.train(raw) for _ in range(5)]
    assert all(c.shape == (16000,) and torch.isfinite(c).all() for c in crops)
    assert not torch.equal(crops[0], crops[1])
    assert list(noise_dir.iterdir()) == [noise_dir / "n.ogg"]  # resampled noise went to the cache


def test_strong_augmentation_transforms_a_short_sound_before_padding():
    """Stretching and pitch shifting cost what they are given: a short recording gets them on its own
    samples, not on the padded clip; the clip is still full length and a slowed-down word is not cut off."""
    spec = InputSpec(task="audio", size=0, channels=1, sample_rate=16000, clip_seconds=1.0)
    pre = AudioPreprocessor(spec, augment="strong", seed=0)
    word = tone(16000, 0.5)
    pre.train(word)
    seen = []
    sound, _ = pre.augment_

    def recording(samples, sample_rate):
        seen.append(len(samples))
        return sound(samples=samples, sample_rate=sample_rate)

    pre.augment_ = (recording, lambda samples, sample_rate: samples)  # no shift, no noise: the sound alone
    random.seed(0)  # audiomentations draws from the global generators; 1 in 8 draws slows the word by > 10%
    np.random.seed(0)
    out = [pre.train(word) for _ in range(60)] + [pre.train(tone(16000, 2.5))]
    assert seen[:60] == [8000] * 60 and seen[60] == 16000  # a long recording is cut to the clip first
    assert all(o.shape == (16000,) for o in out)
    sounding = [int((o.abs() > 1e-3).sum()) for o in out[:60]]
    assert max(sounding) > 8000 * 1.1  # some were slowed down (longer than the word) and kept whole


def _checksums(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_augment_to_variants_writes_only_to_cache(tmp_path):
    data = tmp_path / "data"
    for label, freq in (("low", 220.0), ("high", 880.0)):
        (data / label).mkdir(parents=True)
        sf.write(data / label / "cry.wav", tone(16000, 1.0, freq), 16000)
    before = _checksums(data)
    sources = [(str(p), load_audio(p, 16000)) for p in sorted(data.rglob("*.wav"))]
    variants = augment_to_variants(sources, 3, 16000, level="strong", seed=0)
    assert [len(v) for v in variants] == [3, 3]
    cache = tmp_path / "cache" / "augmented"
    for paths in variants:
        waves = [sf.read(p, dtype="float32")[0] for p in paths]
        assert all(Path(p).is_relative_to(cache) for p in paths)
        assert all(sf.info(p).samplerate == 16000 and len(w) == 16000 for p, w in zip(paths, waves))
        assert not np.array_equal(waves[0], waves[1])
        assert all(np.abs(w).max() <= 1.0 for w in waves)  # louder variants are brought back to full scale
    assert _checksums(data) == before  # the user's folder is untouched
    assert augment_to_variants(sources, 3, 16000, level="strong", seed=0) == variants  # cached, same paths


def test_spec_augment_masks_only_in_training():
    x = torch.randn(4, 64, 100)
    sa = SpecAugment(freq_width=10, time_width=20, n_masks=2)
    assert torch.equal(sa.eval()(x), x)
    y = sa.train()(x)
    changed = (y != x).float().mean()
    assert 0 < changed < 0.6
