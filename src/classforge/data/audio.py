"""Audio decoding, clip fitting and augmentation. The same `load_audio` + `fit_clip` serve training, evaluation
and prediction, so a served model preprocesses exactly as the evaluated one did. The log-mel front end is part
of each backbone (classforge.models.audio), so everything here works on waveforms."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import random
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch

from classforge.core.cache import cache_dir
from classforge.core.errors import BadFile, ClassforgeError
from classforge.core.spec import InputSpec
from classforge.data.discover import AUDIO_EXT
from classforge.data.ops import apply_audio_ops  # all apply them

SILENCE_PEAK = 1e-4  # below this peak amplitude (about -80 dBFS) a clip holds nothing to learn from


def _open(src) -> io.BytesIO | str:
    """A readable source for soundfile; empty input is rejected here."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise BadFile("empty file (0 bytes)")
        return io.BytesIO(bytes(src))
    if Path(src).stat().st_size == 0:
        raise BadFile("empty file (0 bytes)")
    return str(src)


def _declared_wav_frames(f: sf.SoundFile) -> int:
    """libsndfile shrinks a cut WAV's frame count to what is there; its header log keeps the size the header
    claimed ("data : 64000 (should be 956)"). Streaming writers leave a placeholder size: ignore those."""
    claim = re.search(r"data : (\d+) \(should be \d+\)", f.extra_info)
    align = re.search(r"Block Align\s*:\s*(\d+)", f.extra_info)
    if not claim or not align or int(claim.group(1)) >= 0x7FFFFFFF or int(align.group(1)) == 0:
        return 0
    return int(claim.group(1)) // int(align.group(1))


def _decode(src) -> tuple[np.ndarray, dict]:
    """Decode the whole file (truncation often shows only while reading) -> (frames, channels) float32, info."""
    fp = _open(src)
    try:
        with sf.SoundFile(fp) as f:
            info = {"sample_rate": f.samplerate, "channels": f.channels, "format": f.format, "subtype": f.subtype}
            expected = max(f.frames, _declared_wav_frames(f) if f.format in ("WAV", "WAVEX") else 0)
            data = f.read(dtype="float32", always_2d=True)
    except sf.LibsndfileError as e:
        raise BadFile(f"cannot decode audio ({e.error_string.rstrip('.')})") from None
    except RuntimeError as e:  # decoders raise plain RuntimeErrors too, e.g. "flac decoder lost sync"
        raise BadFile(f"cannot decode audio ({str(e)[:80]})") from None
    n = len(data)
    if n == 0:
        raise BadFile("no audio in the file (0 frames)")
    # MP3 frame counts are estimates (VBR headers), so only the other formats are held to theirs.
    if info["format"] != "MP3" and n < 0.95 * expected:
        raise BadFile(f"truncated file (decoded {n} of {expected} frames)")
    if not np.isfinite(data).all():
        raise BadFile("contains NaN or infinite samples")
    peak = float(np.abs(data).max())
    if peak < SILENCE_PEAK:
        raise BadFile(f"silent (peak amplitude {peak:.1e})")
    info.update(frames=n, duration_s=n / info["sample_rate"])
    return data, info


def inspect_audio(path) -> dict:
    """Decode and check a file; returns duration_s, sample_rate, channels, frames, format, subtype.
    Raises BadFile with a short reason for empty, corrupt, truncated or silent files."""
    _, info = _decode(path)
    return {k: info[k] for k in ("duration_s", "sample_rate", "channels", "frames", "format", "subtype")}


def waveform_with_rate(src) -> tuple[np.ndarray, int] | None:
    """(waveform, sample rate) given as a pair, the waveform a numpy array or a torch tensor of shape (T,),
    (T, C) or (C, T) with C <= 8, as mono float32 (T,); None when `src` is not such a pair. A bare array is an
    error: its sample rate cannot be guessed."""
    if hasattr(src, "shape") and not isinstance(src, (bytes, bytearray)):
        raise BadFile("a waveform needs its sample rate: pass (waveform, sample_rate)")
    if not (isinstance(src, tuple) and len(src) == 2 and hasattr(src[0], "shape")):
        return None
    wave, rate = src
    a = wave.detach().cpu().numpy() if not isinstance(wave, np.ndarray) else wave
    a = np.asarray(a, dtype=np.float32)
    if a.ndim == 2:
        a = a.mean(axis=0 if a.shape[0] <= 8 < a.shape[1] else 1)
    if a.ndim != 1 or a.size == 0:
        raise BadFile(f"a waveform must be (T,), (T, C) or (C, T) with samples, not {tuple(np.shape(wave))}")
    if not np.isfinite(a).all():
        raise BadFile("contains NaN or infinite samples")
    if not isinstance(rate, (int, np.integer)) or rate <= 0:
        raise BadFile(f"sample rate must be a positive integer, not {rate!r}")
    return a, int(rate)


def load_audio(src, sample_rate: int) -> np.ndarray:
    """Path, bytes or (waveform, sample rate) -> mono (mean of channels) float32 (T,) at sample_rate (soxr HQ
    resampling)."""
    given = waveform_with_rate(src)
    if given is not None:
        mono, rate = given
        if rate != sample_rate:
            mono = soxr.resample(mono, rate, sample_rate, quality="HQ")
        return np.ascontiguousarray(mono, dtype=np.float32)
    data, info = _decode(src)
    mono = data.mean(axis=1)
    if info["sample_rate"] != sample_rate:
        mono = soxr.resample(mono, info["sample_rate"], sample_rate, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


def fit_clip(wave: np.ndarray, n_samples: int, mode: str = "center",
             rng: np.random.Generator | None = None) -> np.ndarray:
    """Exactly n_samples: short clips are zero-padded around the centre; long ones are cut in the middle
    (mode="center", evaluation) or at a random offset (mode="random", training)."""
    n = len(wave)
    if n < n_samples:
        left = (n_samples - n) // 2
        return np.pad(wave, (left, n_samples - n - left))
    if mode == "random":
        start = int((rng or np.random.default_rng()).integers(0, n - n_samples + 1))
    else:
        start = (n - n_samples) // 2
    return wave[start:start + n_samples]


# ----------------------------------------------------------------------------------------------------------------
# Augmentation
# ----------------------------------------------------------------------------------------------------------------


def prepare_background(background_dir: str | Path, sample_rate: int) -> Path:
    """Decoded, mono, resampled copies of the background sounds in the cache: AddBackgroundNoise then reads
    plain WAVs at the target rate (no resampling on every call), and the user's folder is never written."""
    src = Path(background_dir).expanduser()
    files = sorted(p for p in src.rglob("*") if p.suffix.lower() in AUDIO_EXT and not p.name.startswith("."))
    h = hashlib.sha1(f"{src.resolve()}|{sample_rate}".encode())
    for p in files:
        h.update(f"{p}|{p.stat().st_size}|{p.stat().st_mtime_ns}".encode())
    dest = cache_dir() / "background" / h.hexdigest()[:16]
    if not (dest / ".complete").exists():
        dest.mkdir(parents=True, exist_ok=True)
        for i, p in enumerate(files):
            try:
                sf.write(dest / f"{i:05d}.wav", load_audio(p, sample_rate), sample_rate, subtype="FLOAT")
            except BadFile:
                continue  # a broken or silent noise file is just not used
        (dest / ".complete").touch()
    if not any(dest.glob("*.wav")):
        raise ClassforgeError(f"--background-dir {src}: no usable audio files (wav, flac, ogg, mp3)")
    return dest


def build_augment(level: str, sample_rate: int, background_dir: str | Path | None = None,
                  snr_db: tuple[float, float] = (3.0, 30.0)):
    """An audiomentations pipeline (callable (wave, sample_rate) -> wave) or None for level "none".
    light: gain, shift, a little noise. strong: also time stretch, pitch shift, high/low-pass filters.
    Both mix in background sounds at snr_db when background_dir is given. Stretching and pitch shifting use
    signalsmith-stretch (python-stretch): fast, and no ~20 s numba compile as librosa's phase vocoder."""
    parts = augment_parts(level, sample_rate, background_dir, snr_db)
    return None if parts is None else _compose(parts[0] + parts[1])


def augment_parts(level: str, sample_rate: int, background_dir: str | Path | None = None,
                  snr_db: tuple[float, float] = (3.0, 30.0), keep_length: bool = True):
    """build_augment's transforms in two lists, or None for "none": those that act on the sound itself
    (stretch, pitch, filters, gain: their cost grows with the samples they get, and zeros stay zeros, so they
    can run on a short recording before it is padded) and those that act on the whole clip (shift, noise,
    background). keep_length=False: a time-stretched sound keeps its new length (nothing cut off)."""
    if level == "none":
        return None
    if level not in ("light", "strong"):
        raise ClassforgeError(f"augment level {level!r}: use none, light or strong")
    import audiomentations as A  # heavy import (librosa): only when augmenting

    if level == "light":
        sound = [A.Gain(min_gain_db=-6, max_gain_db=6, p=0.5)]
        clip = [A.Shift(min_shift=-0.1, max_shift=0.1, p=0.5),
                A.AddGaussianSNR(min_snr_db=20, max_snr_db=40, p=0.3)]
    else:
        sound = [A.TimeStretch(min_rate=0.8, max_rate=1.25, method="signalsmith_stretch",
                               leave_length_unchanged=keep_length, p=0.5),
                 A.PitchShift(min_semitones=-3, max_semitones=3, method="signalsmith_stretch", p=0.5),
                 A.HighPassFilter(min_cutoff_freq=20, max_cutoff_freq=400, p=0.3),
                 A.LowPassFilter(min_cutoff_freq=2000, max_cutoff_freq=min(7500, 0.45 * sample_rate), p=0.3),
                 A.Gain(min_gain_db=-12, max_gain_db=12, p=0.5)]
        clip = [A.Shift(min_shift=-0.2, max_shift=0.2, p=0.5),
                A.AddGaussianNoise(min_amplitude=0.001, max_amplitude=0.015, p=0.3)]
    if background_dir:
        clip.append(A.AddBackgroundNoise(sounds_path=str(prepare_background(background_dir, sample_rate)),
                                         min_snr_db=snr_db[0], max_snr_db=snr_db[1],
                                         p=0.5 if level == "strong" else 0.3))
    return sound, clip


def _compose(ops):
    import audiomentations as A

    return A.Compose(ops)


def apply_augment(augment, wave: np.ndarray, sample_rate: int) -> np.ndarray:
    """Run an audiomentations pipeline; bring peaks above full scale (e.g. +12 dB gain on a loud clip) back
    to 1.0, since no real recording exceeds it."""
    out = augment(np.ascontiguousarray(wave, dtype=np.float32), sample_rate=sample_rate)
    peak = float(np.abs(out).max())
    return out / peak if peak > 1.0 else out


@contextlib.contextmanager
def _seeded(seed: int):
    """audiomentations draws from the global `random` and `np.random`: seed them, then restore them."""
    py_state, np_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def augment_to_variants(samples_waves: Sequence[tuple[str, np.ndarray]], n: int, sample_rate: int,
                        level: str = "strong", background_dir: str | Path | None = None,
                        snr_db: tuple[float, float] = (3.0, 30.0), seed: int = 0) -> list[list[str]]:
    """Offline `--augment-to N`: N augmented variants of every (source path, decoded wave) pair, written as WAV
    into the cache (never into the data folder). Returns the variant paths per source, in input order, so the
    caller gives each variant its source's split and group (no recording on both sides of a split)."""
    h = hashlib.sha1(f"{n}|{sample_rate}|{level}|{background_dir}|{snr_db}|{seed}".encode())
    for path, wave in samples_waves:
        h.update(str(path).encode())
        h.update(np.ascontiguousarray(wave, dtype=np.float32).tobytes())  # edited recordings get new variants
    dest = cache_dir() / "augmented" / h.hexdigest()[:16]
    names = [[f"{i:05d}_{Path(path).parent.name}_{Path(path).stem}_v{j:02d}.wav" for j in range(n)]
             for i, (path, _) in enumerate(samples_waves)]
    if not (dest / ".complete").exists():
        augment = build_augment(level, sample_rate, background_dir, snr_db)
        dest.mkdir(parents=True, exist_ok=True)
        with _seeded(seed):
            for (_, wave), files in zip(samples_waves, names):
                for name in files:
                    out = apply_augment(augment, wave, sample_rate) if augment else wave
                    sf.write(dest / name, out, sample_rate, subtype="FLOAT")  # float: no 16-bit rounding
        (dest / ".complete").touch()
    return [[str(dest / name) for name in files] for files in names]


# ----------------------------------------------------------------------------------------------------------------
# The preprocessor the training loop and the Predictor share (ImagePreprocessor has the same three methods)
# ----------------------------------------------------------------------------------------------------------------


class AudioPreprocessor:
    """load(src) -> decoded mono wave at the backbone's rate (what the in-memory cache holds);
    eval(raw) -> (n_samples,) float32 tensor, centred; train(raw) -> random crop + augmentation."""

    def warm_up(self) -> None:
        """Nothing to build ahead of the first file."""

    def __init__(self, spec: InputSpec, augment: str = "none", background_dir: str | None = None,
                 snr_db: tuple[float, float] = (3.0, 30.0), seed: int = 0):
        if spec.task != "audio" or spec.sample_rate <= 0 or spec.clip_seconds <= 0:
            raise ClassforgeError(f"AudioPreprocessor needs an audio InputSpec with a sample rate and clip length; "
                                  f"got {spec}")
        self.spec = spec
        self.augment = augment
        self.background_dir = background_dir
        self.snr_db = snr_db
        self.seed = seed
        self.augment_ = None
        self.rng_: np.random.Generator | None = None
        self._rng_pid: int | None = None

    @property
    def n_samples(self) -> int:
        return round(self.spec.sample_rate * self.spec.clip_seconds)

    def load(self, src) -> np.ndarray:
        wave = load_audio(src, self.spec.sample_rate)
        if self.spec.preprocess:  # --preprocess ops (lowpass=, bits=): here, so training, evaluation and predict
            wave = apply_audio_ops(wave, self.spec.sample_rate, self.spec.preprocess)
        return wave

    def eval(self, raw: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(fit_clip(raw, self.n_samples, "center"), dtype=np.float32))

    def train(self, raw: np.ndarray) -> torch.Tensor:
        n, rate = self.n_samples, self.spec.sample_rate
        wave = raw if len(raw) <= n else fit_clip(raw, n, "random", self._rng())
        if self.augment == "none":
            return torch.from_numpy(np.array(fit_clip(wave, n), dtype=np.float32))
        sound, clip = self._augmenters()
        # the sound's own transforms before the padding: a short recording costs them only its own length
        wave = fit_clip(apply_augment(sound, wave, rate), n, "random", self._rng())
        return torch.from_numpy(np.array(apply_augment(clip, wave, rate), dtype=np.float32))

    def _augmenters(self):
        """(transforms of the sound, transforms of the clip), built on first use: eval-only users never import
        audiomentations."""
        if self.augment_ is None:
            sound, clip = augment_parts(self.augment, self.spec.sample_rate, self.background_dir, self.snr_db,
                                        keep_length=False)
            self.augment_ = (_compose(sound), _compose(clip))
        return self.augment_

    def _rng(self) -> np.random.Generator:
        # DataLoader workers are forked copies: derive the crop generator per process from torch's seed
        # (distinct per worker, fixed by seed_everything) so workers do not repeat each other's crops.
        if self._rng_pid != os.getpid():
            self._rng_pid = os.getpid()
            self.rng_ = np.random.default_rng([self.seed, torch.initial_seed() % 2**32])
        return self.rng_
