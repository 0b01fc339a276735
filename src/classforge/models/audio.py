"""Audio backbones. Each maps a mono waveform (B, T) at its own sample rate to features (B, D) and owns its
front end (log-mel), so a saved model is waveform -> logits and the Predictor only decodes, resamples and pads.

In an exported model the short-time Fourier transform is a `conv1d` with a precomputed windowed DFT basis
instead of `torch.stft`: the whole model then exports to ONNX opset 17 as plain Conv/MatMul/Log nodes (no complex
tensors, no STFT op) and runs in ONNX Runtime. That costs more arithmetic than an FFT, so in PyTorch (training,
the torch engines) the same power spectrum comes from an FFT (see `LogMel.power`).
This module imports only torch and numpy so that the registry keeps working without the audio extra.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from classforge.core.cache import cache_dir
from classforge.core.errors import ClassforgeError
from classforge.core.net import reachable
from classforge.core.spec import InputSpec
from classforge.models.registry import Backbone, register_backbone
from classforge.models.weights import hub_reachable, load_state_file, sha256_file

# ----------------------------------------------------------------------------------------------------------------
# Front end: conv-STFT power spectrum -> mel -> log
# ----------------------------------------------------------------------------------------------------------------


def kaldi_mel_banks(n_mels: int, n_fft: int, sample_rate: int, f_min: float, f_max: float) -> torch.Tensor:
    """Kaldi-style filters: triangles that are linear on the mel scale 1127 ln(1 + f/700), evaluated at the
    mel value of every DFT bin (not linear in Hz as librosa/HTK). Returns (n_mels, n_fft // 2 + 1)."""

    def mel(f):
        return 1127.0 * np.log1p(np.asarray(f, dtype=np.float64) / 700.0)

    edges = np.linspace(mel(f_min), mel(f_max), n_mels + 2)  # left edge, centre, right edge of each filter
    left, centre, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    bins = mel(np.arange(n_fft // 2 + 1) * sample_rate / n_fft)[None, :]
    up = (bins - left) / (centre - left)
    down = (right - bins) / (right - centre)
    return torch.tensor(np.clip(np.minimum(up, down), 0.0, None), dtype=torch.float32)


def dft_kernel(window: np.ndarray, n_fft: int, n_bins: int, offset: int = 0,
               frame_op: np.ndarray | None = None) -> torch.Tensor:
    """conv1d weight (2 * n_bins, 1, len(window)): rows are cos and -sin of DFT bins 0..n_bins-1, times the
    window. `offset` places the window inside the n_fft frame (torch.stft centres a short window); `frame_op`
    is any linear per-frame operation applied before windowing (Kaldi's DC removal and pre-emphasis)."""
    n = np.arange(len(window)) + offset
    angle = 2.0 * np.pi * np.arange(n_bins)[:, None] * n[None, :] / n_fft
    basis = np.concatenate([np.cos(angle), -np.sin(angle)]) * window[None, :]
    if frame_op is not None:
        basis = basis @ frame_op
    return torch.tensor(basis, dtype=torch.float32).unsqueeze(1)


def hann(length: int, periodic: bool) -> np.ndarray:
    return torch.hann_window(length, periodic=periodic, dtype=torch.float64).numpy()


def kaldi_frame_op(frame_length: int, preemph: float = 0.97) -> np.ndarray:
    """Kaldi's per-frame processing as one matrix: remove the frame's mean, then pre-emphasise
    (x[i] -= c * x[i-1], and x[0] -= c * x[0])."""
    dc = np.eye(frame_length) - 1.0 / frame_length
    pre = np.eye(frame_length) - preemph * np.eye(frame_length, k=-1)
    pre[0, 0] = 1.0 - preemph
    return pre @ dc


def _exporting() -> bool:
    """Whether the module is being traced or exported (ONNX has no complex tensors) or compiled (`--compile`:
    the graph compilers handle complex tensors less well than a conv): then the STFT is the conv."""
    return (torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export()
            or torch.compiler.is_compiling())


class LogMel(nn.Module):
    """Waveform (B, T) -> log-mel (B, n_mels, frames), in float32 even under autocast.

    center=True: frames are centred on t * hop (reflect padding by n_fft // 2, as torch.stft does).
    center=False: frames start at t * hop (Kaldi's snip_edges). log_mode "add": log(mel + eps) (EfficientAT);
    "clamp": log(max(mel, eps)) (Kaldi)."""

    def __init__(self, sample_rate: int, n_fft: int, hop: int, n_mels: int, f_min: float, f_max: float,
                 window: np.ndarray, center: bool = True, frame_op: np.ndarray | None = None,
                 log_eps: float = 1e-5, log_mode: str = "add"):
        super().__init__()
        self.n_fft, self.hop, self.center = n_fft, hop, center
        self.log_eps, self.log_mode = log_eps, log_mode
        mel = kaldi_mel_banks(n_mels, n_fft, sample_rate, f_min, f_max)
        # A direct DFT costs frames x window x bins multiply-adds (about 2/3 of mn04's compute on 1 s clips);
        # bins above the last filter carry no weight, so they are left out of the kernel.
        n_bins = int(torch.nonzero(mel.sum(0)).max()) + 1
        self.offset = (n_fft - len(window)) // 2 if center else 0
        self.n_bins = n_bins
        self.register_buffer("kernel", dft_kernel(window, n_fft, n_bins, self.offset, frame_op), persistent=False)
        self.register_buffer("mel", mel[:, :n_bins].contiguous(), persistent=False)
        # the FFT path's per-frame operation (Kaldi's) and window: the same linear map as the kernel's rows
        self.register_buffer("window", torch.tensor(window, dtype=torch.float32), persistent=False)
        self.register_buffer("frame_op", None if frame_op is None else
                             torch.tensor(frame_op, dtype=torch.float32).T.contiguous(), persistent=False)

    def power(self, wave: torch.Tensor) -> torch.Tensor:
        x = wave.unsqueeze(1)  # (B, 1, T)
        if self.center:
            # torch.stft pads by n_fft // 2; the window only covers the middle of each n_fft frame, so the
            # kernel is window-long and the padding shrinks by the window's offset (same frames, less work).
            pad = self.n_fft // 2 - self.offset
            x = F.pad(x, (pad, pad), mode="reflect")
        if _exporting():
            spec = F.conv1d(x, self.kernel, stride=self.hop)  # (B, 2 * bins, frames): real rows, then imaginary
            re, im = spec.chunk(2, dim=1)
            return re * re + im * im  # (B, bins, frames)
        return self._fft_power(x.squeeze(1))

    def _fft_power(self, x: torch.Tensor) -> torch.Tensor:
        """The conv kernel's power spectrum by FFT: the same sums (to float rounding) at a fraction of the
        arithmetic; training and the torch engines run this, the exported graph the conv."""
        frames = x.unfold(-1, self.window.numel(), self.hop)  # (B, frames, window)
        if self.frame_op is not None:
            frames = frames @ self.frame_op
        # where the window sits in the n_fft frame (`offset`) only turns each bin's phase: the power is the same
        spec = torch.fft.rfft(frames * self.window, n=self.n_fft)
        return (spec.real ** 2 + spec.imag ** 2)[..., :self.n_bins].transpose(1, 2)  # (B, bins, frames)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(wave.device.type):
            # bf16 keeps ~3 significant digits: too few for a 1024-tap DFT sum and a log of small energies.
            with torch.autocast(wave.device.type, enabled=False):
                return self._log_mel(wave.float())
        return self._log_mel(wave)

    def _log_mel(self, wave: torch.Tensor) -> torch.Tensor:
        mel = torch.matmul(self.mel, self.power(wave))  # (B, n_mels, frames)
        if self.log_mode == "add":
            return torch.log(mel + self.log_eps)
        return torch.log(torch.clamp(mel, min=self.log_eps))


class SpecAugment(nn.Module):
    """SpecAugment-style masking of (B, n_mels, frames) log-mels, active only in training mode: each example
    gets `n_masks` frequency bands of up to `freq_width` bins and time spans of up to `time_width` frames
    replaced by its own mean (a zero would be a loud value on a log scale). No parameters, so adding it
    changes neither the saved weights nor the exported (eval-mode) model."""

    def __init__(self, freq_width: int = 16, time_width: int = 20, n_masks: int = 2):
        super().__init__()
        self.freq_width, self.time_width, self.n_masks = freq_width, time_width, n_masks

    @staticmethod
    def _mask(batch: int, size: int, max_width: int, device) -> torch.Tensor:
        width = torch.randint(0, max(1, min(max_width, size)) + 1, (batch, 1), device=device)
        start = (torch.rand(batch, 1, device=device) * (size - width + 1)).long()
        pos = torch.arange(size, device=device)[None, :]
        return (pos >= start) & (pos < start + width)  # (B, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        b, n_mels, frames = x.shape
        mask = torch.zeros_like(x, dtype=torch.bool)
        for _ in range(self.n_masks):
            mask |= self._mask(b, n_mels, self.freq_width, x.device)[:, :, None]
            mask |= self._mask(b, frames, self.time_width, x.device)[:, None, :]
        return torch.where(mask, x.mean(dim=(1, 2), keepdim=True), x)


def _mel_augment(enabled: bool | dict) -> nn.Module:
    if not enabled:
        return nn.Identity()
    return SpecAugment(**(enabled if isinstance(enabled, dict) else {}))


def _reachable(host: str, timeout: float = 1.5) -> bool:
    return reachable(host, 443, timeout)


# ----------------------------------------------------------------------------------------------------------------
# EfficientAT MobileNetV3 (Schmid et al., "Efficient Large-Scale Audio Tagging via Transformer-to-CNN Knowledge
# Distillation", ICASSP 2023); classforge's own code, following the structure of the reference implementation
# (github.com/fschmid56/EfficientAT, MIT) so that its AudioSet checkpoint loads tensor for tensor.
# ----------------------------------------------------------------------------------------------------------------

# AudioSet -> a new sound task is a larger shift than ImageNet -> photos: the image fine-tune recipe (8 epochs,
# lr 1e-3, backbone x0.1) leaves a pretrained audio tagger under-fitted, so these take longer and larger steps.
AUDIO_FINETUNE = {"epochs": 15, "lr": "3e-3", "backbone_lr_mult": 0.3}
# While the network trains (not for cached embeddings): SpecAugment masking on the log-mels, a no-op at eval time.
TRAIN_ARGS = {"spec_augment": True}

MN04_FILE = "mn04_as_mAP_432.pt"
MN04_URL = f"https://github.com/fschmid56/EfficientAT/releases/download/v0.0.1/{MN04_FILE}"
MN04_SHA256 = "899a8c6217063f6941793102a2780b3dd788ab11fce468d9cf5f0577c453321c"

# MobileNetV3-Large at width 1.0: (kernel, expanded, out, squeeze-excite, hard-swish, stride) per block.
_MNV3_LARGE = [
    (3, 16, 16, False, False, 1), (3, 64, 24, False, False, 2), (3, 72, 24, False, False, 1),
    (5, 72, 40, True, False, 2), (5, 120, 40, True, False, 1), (5, 120, 40, True, False, 1),
    (3, 240, 80, False, True, 2), (3, 200, 80, False, True, 1), (3, 184, 80, False, True, 1),
    (3, 184, 80, False, True, 1), (3, 480, 112, True, True, 1), (3, 672, 112, True, True, 1),
    (5, 672, 160, True, True, 2), (5, 960, 160, True, True, 1), (5, 960, 160, True, True, 1),
]


def make_divisible(v: float, divisor: int = 8) -> int:
    """Round channels to a multiple of 8, never more than 10% below v (the MobileNet convention)."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


class ConvBNAct(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1,
                 act: type[nn.Module] | None = nn.ReLU):
        layers = [nn.Conv2d(c_in, c_out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                  nn.BatchNorm2d(c_out, eps=1e-3, momentum=0.01)]
        super().__init__(*layers, *([act()] if act else []))


class SqueezeExcite(nn.Module):
    """Channel attention: global mean -> bottleneck -> sigmoid gate per channel."""

    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.fc1 = nn.Linear(channels, squeeze)
        self.fc2 = nn.Linear(squeeze, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3))))))  # (B, C)
        return x * s[:, :, None, None]


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, kernel: int, expanded: int, c_out: int, se: bool, hswish: bool, stride: int):
        super().__init__()
        act = nn.Hardswish if hswish else nn.ReLU
        layers: list[nn.Module] = []
        if expanded != c_in:
            layers.append(ConvBNAct(c_in, expanded, 1, act=act))
        layers.append(ConvBNAct(expanded, expanded, kernel, stride, groups=expanded, act=act))
        if se:
            layers.append(SqueezeExcite(expanded, make_divisible(expanded // 4)))
        layers.append(ConvBNAct(expanded, c_out, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.residual else y


def mobilenet_v3_features(width: float) -> tuple[nn.Sequential, int]:
    """Stem + 15 inverted residual blocks + 1x1 conv to 6x the last width, on a 1-channel log-mel image."""
    ch = make_divisible(16 * width)
    layers: list[nn.Module] = [ConvBNAct(1, ch, 3, stride=2, act=nn.Hardswish)]
    for kernel, exp, out, se, hs, stride in _MNV3_LARGE:
        c_out = make_divisible(out * width)
        layers.append(InvertedResidual(ch, kernel, make_divisible(exp * width), c_out, se, hs, stride))
        ch = c_out
    layers.append(ConvBNAct(ch, 6 * ch, 1, act=nn.Hardswish))
    return nn.Sequential(*layers), 6 * ch


class EfficientATBackbone(Backbone):
    """EfficientAT "mn" audio tagger as a feature extractor: 32 kHz waveform -> pre-emphasis -> |STFT|^2
    (n_fft 1024, Hann window 800, hop 320) -> 128 Kaldi mel bins (0-15 kHz) -> log(x + 1e-5) -> (x + 4.5) / 5
    -> MobileNetV3 -> global average pool. The feature is that pooled map (6x the last block's width), the
    layer the reference model returns as its embedding; the AudioSet MLP head is kept aside for
    `audioset_logits` (not a submodule: fine-tuning must not train or save 0.47M unused parameters)."""

    sample_rate = 32000

    def __init__(self, width: float = 0.4, clip_seconds: float = 1.0, spec_augment: bool | dict = False):
        super().__init__()
        self.frontend = LogMel(self.sample_rate, n_fft=1024, hop=320, n_mels=128, f_min=0.0, f_max=15000.0,
                               window=hann(800, periodic=False), center=True, log_eps=1e-5, log_mode="add")
        self.mel_augment = _mel_augment(spec_augment)
        self.features, self.feature_dim = mobilenet_v3_features(width)
        self.spec = InputSpec(task="audio", size=0, channels=1, sample_rate=self.sample_rate,
                              clip_seconds=float(clip_seconds))
        self.weights_source = "random"
        self._tagger: list[nn.Module] = []  # a list hides the AudioSet head from parameters() and state_dict()
        self._checkpointing = False

    def log_mel(self, wave: torch.Tensor) -> torch.Tensor:
        # Pre-emphasis y[n] = x[n+1] - 0.97 x[n] over the whole clip (one sample shorter), as the reference.
        x = self.frontend(wave[:, 1:] - 0.97 * wave[:, :-1])
        return (x + 4.5) / 5.0  # (B, 128, frames); the reference's fixed normalisation

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        x = self.mel_augment(self.log_mel(wave)).unsqueeze(1)  # (B, 1, 128, frames)
        # oneDNN's depthwise convolutions are much faster channels-last (x2 with the weights converted too,
        # `model.to(memory_format=torch.channels_last)`); the layout is invisible to ONNX and to the results.
        x = x.contiguous(memory_format=torch.channels_last)
        if self._checkpointing and self.training:
            x = torch.utils.checkpoint.checkpoint_sequential(self.features, 4, x, use_reentrant=False)
        else:
            x = self.features(x)  # (B, C, 128 / 32, frames / 32)
        return x.mean(dim=(2, 3))  # (B, feature_dim)

    def audioset_logits(self, wave: torch.Tensor) -> torch.Tensor:
        """The 527 AudioSet logits of the pretrained tagger (sigmoid gives per-class probabilities)."""
        if not self._tagger:
            raise ClassforgeError("These weights have no AudioSet head (only the official checkpoint has one)")
        feats = self.forward(wave)
        return self._tagger[0].to(feats.device, feats.dtype)(feats)

    def param_groups(self) -> list[list[nn.Parameter]]:
        cuts = [(0, 4), (4, 7), (7, 13), (13, len(self.features))]  # stem+early, C2, C3, C4+head conv
        return [[p for i in range(a, b) for p in self.features[i].parameters()] for a, b in cuts]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self._checkpointing = enable

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Load the official AudioSet state dict, or a fine-tuned one (e.g. a run's model.safetensors)."""
        sd = load_state_file(path)
        # The reference nests SE in `conc_se_layers.0`; classforge runs prefix the backbone with `backbone.`.
        sd = {re.sub(r"\.conc_se_layers\.0\.", ".", k.removeprefix("backbone.").removeprefix("module.")): v
              for k, v in sd.items()}
        own = self.features.state_dict()
        feats = {k.removeprefix("features."): v for k, v in sd.items() if k.startswith("features.")}
        # BatchNorm step counters do not change the function; some exporters drop them.
        bad = [k for k in own if not k.endswith("num_batches_tracked")
               and (k not in feats or feats[k].shape != own[k].shape)]
        if bad:
            raise ClassforgeError(f"{path}: {len(bad)} of {len(own)} tensors missing or of another shape "
                                  f"(first: features.{bad[0]}); not an EfficientAT mn04 checkpoint?")
        self.features.load_state_dict({k: v for k, v in feats.items() if k in own}, strict=False)
        if "classifier.2.weight" in sd and "classifier.5.weight" in sd:
            self._tagger = [self._audioset_head(sd)]

    @staticmethod
    def _audioset_head(sd: dict) -> nn.Module:
        w1, w2 = sd["classifier.2.weight"], sd["classifier.5.weight"]
        head = nn.Sequential(nn.Linear(w1.shape[1], w1.shape[0]), nn.Hardswish(), nn.Linear(w2.shape[1], w2.shape[0]))
        head.load_state_dict({"0.weight": w1, "0.bias": sd["classifier.2.bias"],
                              "2.weight": w2, "2.bias": sd["classifier.5.bias"]})
        return head.eval().requires_grad_(False)


def resolve_mn04_weights(weights: str | None) -> tuple[Path, bool]:
    """--weights PATH, else $CLASSFORGE_MN04_WEIGHTS, else the cache, else download from the official release.
    Returns the path and whether it came from the user (whose file may legitimately differ: fine-tuned)."""
    for given in (weights, os.environ.get("CLASSFORGE_MN04_WEIGHTS")):
        if given:
            return Path(given).expanduser(), True
    cached = cache_dir() / "weights" / MN04_FILE
    if not cached.is_file():
        download_verified(MN04_URL, cached, MN04_SHA256)
    return cached, False


def download_verified(url: str, dest: Path, sha256: str, timeout: float = 30.0) -> None:
    if not _reachable("github.com"):
        raise ClassforgeError(
            f"Cannot download the EfficientAT weights ({dest.name}): github.com is unreachable (offline?). "
            f"Download {url} elsewhere and pass --weights PATH (or set CLASSFORGE_MN04_WEIGHTS), "
            "or use --no-pretrained."
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_suffix(".partial")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(part, "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
    except OSError as e:
        part.unlink(missing_ok=True)
        raise ClassforgeError(f"Download of {url} failed ({e}); pass --weights PATH instead") from None
    digest = sha256_file(part)
    if digest != sha256:
        part.unlink(missing_ok=True)
        raise ClassforgeError(f"Downloaded {dest.name} has sha256 {digest[:12]}..., expected {sha256[:12]}...")
    part.replace(dest)


@register_backbone("efficientat_mn04", "audio",
                   description="EfficientAT MobileNetV3 width 0.4, AudioSet tagger (0.43 mAP), 0.98M params",
                   input_desc="mono 32 kHz waveform (log-mel front end inside)",
                   weights_desc=f"AudioSet: {MN04_FILE} (cache, download, or --weights PATH)",
                   pretrained=True, default_for="audio", recipes={"finetune": AUDIO_FINETUNE},
                   train_args=TRAIN_ARGS,
                   # --strategy auto: the head first; then fine-tuning with strong augmentation (FSDD: 1.000,
                   # benchmarks/results/2026-12-01-fsdd-strategies.md) on loudness-normalised clips (speakers
                   # recorded quieter than the training ones: benchmarks/results/2026-12-01-fsdd-unseen-speakers.md).
                   # No two-stage: under a budget it never came near the fine-tune (FSDD 0.952 vs 0.990, unseen
                   # speakers 0.73-0.75 vs 0.88-0.94), and its time is worth more to the winner's refit
                   auto=[(0, "linear", {}), (1, "finetune", {"augment": "strong", "preprocess": "loudness"})])
def efficientat_mn04(pretrained: bool = True, weights: str | None = None, clip_seconds: float = 1.0,
                     spec_augment: bool | dict = False, **kwargs) -> Backbone:
    model = EfficientATBackbone(0.4, clip_seconds, spec_augment)
    if not pretrained and weights is None:
        return model
    path, from_user = resolve_mn04_weights(weights)
    if not path.is_file():
        raise ClassforgeError(f"Weights file not found: {path}")
    if sha256_file(path) != MN04_SHA256:
        if not from_user:
            raise ClassforgeError(f"{path} is not the official {MN04_FILE} (sha256 mismatch); delete it to re-download")
        warnings.warn(f"{path} differs from the official {MN04_FILE} (sha256); loading it as a fine-tuned "
                      "checkpoint", stacklevel=2)
    model.load_checkpoint(path)
    model.weights_source = f"file:{path}"
    return model


# ----------------------------------------------------------------------------------------------------------------
# A small log-mel CNN trained from scratch (the baseline)
# ----------------------------------------------------------------------------------------------------------------


class ClipMeanNorm(nn.Module):
    """Per-clip normalisation of log-mels over the clip's sounding frames (frames above the zero-padding floor).
    mode "mel" (cepstral-mean style): subtract each mel bin's mean, which removes the recording level (a constant
    on a log scale) and a microphone's or a voice's fixed spectral tilt, but also the spectrum of a stationary
    sound (a steady tone becomes flat). mode "level": subtract one mean over all bins, which removes only the
    level and keeps the spectral shape. Frames of padding or digital silence get each bin's lowest normalised
    sounding value, so the output does not depend on the level either. x: (B, n_mels, frames) log-mels;
    `floor` = the log of the front end's epsilon (the value of exact silence)."""

    MODES = ("mel", "level")

    def __init__(self, floor: float, mode: str = "mel"):
        super().__init__()
        if mode not in self.MODES:
            raise ClassforgeError(f"clip_norm={mode!r}: use mel, level or false")
        self.floor, self.mode = float(floor), mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sounding = x.mean(dim=1, keepdim=True) > self.floor + 0.5  # (B, 1, frames)
        w = sounding.to(x.dtype)
        mean = (x * w).sum(-1, keepdim=True) / w.sum(-1, keepdim=True).clamp(min=1.0)  # (B, n_mels, 1)
        if self.mode == "level":
            mean = mean.mean(dim=1, keepdim=True)  # (B, 1, 1): every bin has the same sounding frames
        y = x - mean
        low = torch.where(sounding, y, torch.full_like(y, float("inf"))).amin(-1, keepdim=True)  # (B, n_mels, 1)
        low = torch.where(torch.isfinite(low), low, torch.zeros_like(low))  # an all-silent clip
        return torch.where(sounding, y, low)


class AudioCNN(Backbone):
    """16 kHz waveform -> 64 log-mels (25 ms Hann window, 10 ms hop, 50 Hz-8 kHz) -> [per-clip mean
    normalisation, `clip_norm="mel"` (or True) / `"level"`] -> per-bin BatchNorm -> 4 x (conv3x3-BN-ReLU,
    2x2 max-pool) -> global average pool."""

    sample_rate = 16000

    def __init__(self, clip_seconds: float = 1.0, widths: tuple[int, ...] = (16, 32, 64, 128),
                 spec_augment: bool | dict = False, clip_norm: bool | str = False):
        super().__init__()
        self.frontend = LogMel(self.sample_rate, n_fft=512, hop=160, n_mels=64, f_min=50.0, f_max=8000.0,
                               window=hann(400, periodic=True), center=True, log_eps=1e-6, log_mode="add")
        mode = {True: "mel", "true": "mel"}.get(clip_norm, clip_norm)  # True: the first (per-bin) mode
        self.clip_norm = ClipMeanNorm(float(np.log(1e-6)), mode) if mode else nn.Identity()
        self.mel_augment = _mel_augment(spec_augment)
        # Learned per-mel-bin standardisation: no dataset statistics need to travel with the model.
        self.norm = nn.BatchNorm1d(64)
        blocks, c_in = [], 1
        for c in widths:
            blocks.append(nn.Sequential(ConvBNAct(c_in, c, 3), nn.MaxPool2d(2)))
            c_in = c
        self.blocks = nn.Sequential(*blocks)
        self.feature_dim = c_in
        self.spec = InputSpec(task="audio", size=0, channels=1, sample_rate=self.sample_rate,
                              clip_seconds=float(clip_seconds))
        self.weights_source = "random"

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        x = self.mel_augment(self.norm(self.clip_norm(self.frontend(wave)))).unsqueeze(1)  # (B, 1, 64, frames)
        x = x.contiguous(memory_format=torch.channels_last)  # faster oneDNN convolutions on CPU
        return self.blocks(x).mean(dim=(2, 3))  # (B, feature_dim)

    def param_groups(self) -> list[list[nn.Parameter]]:
        return [list(self.norm.parameters()) + list(self.blocks[0].parameters())] + \
            [list(b.parameters()) for b in self.blocks[1:]]


@register_backbone("audio_cnn", "audio", description="Small log-mel CNN (4 conv blocks), from scratch",
                   input_desc="mono 16 kHz waveform (64 log-mels inside)", train_args=TRAIN_ARGS,
                   auto=[(2, "scratch", {"augment": "strong"})],  # --strategy auto, after the pretrained ones
                   # per-clip level normalisation: it lifts speakers recorded quieter than the rest (FSDD with a
                   # speaker held out, benchmarks/results) and keeps steady spectra (a tone) intact
                   default_args={"clip_norm": "level"})
def audio_cnn(pretrained: bool = False, weights: str | None = None, clip_seconds: float = 1.0,
              widths: tuple[int, ...] = (16, 32, 64, 128), spec_augment: bool | dict = False,
              clip_norm: bool | str = False, **kwargs) -> Backbone:
    model = AudioCNN(clip_seconds, tuple(widths), spec_augment, clip_norm)
    if weights:
        sd = {k.removeprefix("backbone."): v for k, v in load_state_file(weights).items()}
        model.load_state_dict({k: v for k, v in sd.items() if not k.startswith("head.")})
        model.weights_source = f"file:{weights}"
    return model


# ----------------------------------------------------------------------------------------------------------------
# Audio Spectrogram Transformer (Gong et al. 2021) through Hugging Face transformers
# ----------------------------------------------------------------------------------------------------------------

AST_HUB_ID = "MIT/ast-finetuned-audioset-10-10-0.4593"
AST_MEAN, AST_STD = -4.2677393, 4.5689974  # AudioSet log-fbank statistics used by AST's feature extractor


class ASTBackbone(Backbone):
    """16 kHz waveform -> Kaldi fbank (25 ms Hann frames, 10 ms hop, DC removal, pre-emphasis 0.97, 128 mels
    20 Hz-8 kHz, log) -> zero-padded or cut to the model's max_length frames -> (x - mean) / (2 std) -> AST
    -> mean of the CLS and distillation tokens. Matches ASTFeatureExtractor without its NumPy loop."""

    sample_rate = 16000

    def __init__(self, model: nn.Module, clip_seconds: float = 1.0, mean: float = AST_MEAN, std: float = AST_STD,
                 spec_augment: bool | dict = False):
        super().__init__()
        cfg = model.config
        self.frontend = LogMel(self.sample_rate, n_fft=512, hop=160, n_mels=cfg.num_mel_bins, f_min=20.0,
                               f_max=8000.0, window=hann(400, periodic=False), center=False,
                               frame_op=kaldi_frame_op(400), log_eps=float(np.finfo(np.float32).eps),
                               log_mode="clamp")
        self.mel_augment = _mel_augment(spec_augment)
        self.model = model
        self.max_length, self.mean, self.std = int(cfg.max_length), float(mean), float(std)
        self.feature_dim = int(cfg.hidden_size)
        self.spec = InputSpec(task="audio", size=0, channels=1, sample_rate=self.sample_rate,
                              clip_seconds=float(clip_seconds))

    def fbank(self, wave: torch.Tensor) -> torch.Tensor:
        """The model input (B, max_length, n_mels), as ASTFeatureExtractor computes it."""
        fb = self.frontend(wave).transpose(1, 2)  # (B, frames, n_mels)
        fb = F.pad(fb, (0, 0, 0, self.max_length - fb.shape[1]))  # a negative pad cuts: the model's length is fixed
        return (fb - self.mean) / (2.0 * self.std)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        x = self.mel_augment(self.fbank(wave).transpose(1, 2)).transpose(1, 2)
        return self.model(input_values=x).pooler_output  # (B, hidden)

    def param_groups(self) -> list[list[nn.Parameter]]:
        # transformers 5 keeps the blocks in `layers`; 4.x in `encoder.layer`.
        layers = list(self.model.layers if hasattr(self.model, "layers") else self.model.encoder.layer)
        third = max(1, len(layers) // 3)
        groups = [list(self.model.embeddings.parameters())]
        groups += [[p for layer in layers[i:i + third] for p in layer.parameters()] for i in range(0, len(layers), third)]
        groups[-1] += list(self.model.layernorm.parameters())
        return [g for g in groups if g]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            self.model.gradient_checkpointing_enable()
        else:
            self.model.gradient_checkpointing_disable()


def _ast_from_source(source: str) -> tuple[nn.Module, float, float]:
    """A local save_pretrained folder, or a hub id when the hub is reachable; mean/std from its
    preprocessor_config.json when present."""
    from transformers import ASTModel

    local = Path(source).expanduser()
    t0 = time.time()
    if not local.exists() and not hub_reachable():
        raise ClassforgeError(
            f"Cannot get AST weights {source!r}: the Hugging Face Hub is unreachable (offline?; checked in "
            f"{time.time() - t0:.1f}s). Pass a folder saved with save_pretrained via --weights PATH, "
            "or use --no-pretrained."
        )
    try:
        model = ASTModel.from_pretrained(str(local) if local.exists() else source, local_files_only=local.exists())
    except (OSError, ValueError) as e:
        raise ClassforgeError(f"Could not load AST weights from {source!r}: {e}. Pass --weights PATH.") from None
    mean, std = AST_MEAN, AST_STD
    pre = local / "preprocessor_config.json"
    if pre.is_file():
        cfg = json.loads(pre.read_text())
        mean, std = float(cfg.get("mean", mean)), float(cfg.get("std", std))
    return model, mean, std


@register_backbone("ast", "audio", description="Audio Spectrogram Transformer (Hugging Face transformers)",
                   input_desc="mono 16 kHz waveform (Kaldi fbank inside)",
                   weights_desc=f"AudioSet: hub {AST_HUB_ID} (online) or --weights FOLDER",
                   pretrained=True, recipes={"finetune": AUDIO_FINETUNE}, train_args=TRAIN_ARGS,
                   small_args={"tiny": True})
def ast(pretrained: bool = True, weights: str | None = None, clip_seconds: float = 1.0, tiny: bool = False,
        spec_augment: bool | dict = False, **config) -> Backbone:
    try:
        from transformers import ASTConfig, ASTModel  # optional extra: imported only when AST is asked for
    except ImportError:
        raise ClassforgeError("The `ast` backbone needs transformers: pip install 'classforge[hf]'") from None
    mean, std, source = AST_MEAN, AST_STD, "random"
    if weights or (pretrained and not tiny):
        model, mean, std = _ast_from_source(weights or AST_HUB_ID)
        source = f"file:{weights}" if weights and Path(weights).exists() else f"hub:{weights or AST_HUB_ID}"
    else:
        # tiny: a ~30k-parameter random AST (about 1 s of fbank) for offline tests and smoke runs.
        small = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                 "max_length": 100} if tiny else {}
        model = ASTModel(ASTConfig(**{**small, **config}))
    backbone = ASTBackbone(model, clip_seconds, mean, std, spec_augment)
    backbone.weights_source = source
    return backbone
