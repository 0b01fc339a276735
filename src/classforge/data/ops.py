"""Classical image and audio preprocessing applied identically at train and predict time (`--preprocess`).

The ops are part of the model's input: they are stored in its `InputSpec.preprocess` (so in model.json),
run inside `ImagePreprocessor.load` on every path that reads an image (embedding cache, Lightning fit,
evaluation, `predict`, the server), and they change the embedding-cache key. A served model therefore
cannot skip or reorder them.

Grammar: ops separated by ``,`` or ``+``, each ``name`` or ``name=value``, applied left to right:

========================  ==============================================================================
``autocontrast[=cut]``    stretch the luminance range to 0..255, clipping ``cut`` % at each end (default 0);
                          one curve for all channels (Pillow's ``preserve_tone``), so colours do not shift
``equalize``              histogram equalisation of the luminance (Y of YCbCr); chroma untouched
``gamma=g``               out = 255 · (in/255)^g (g < 1 brightens, g > 1 darkens)
``blur=sigma``            Gaussian blur, standard deviation in pixels (default 1.0)
``bilateral[=sigma]``     edge-preserving bilateral filter (OpenCV), colour sigma (default 30), 5 px window
``nlmeans[=h]``           non-local means denoising (OpenCV ``fastNlMeansDenoisingColored``), strength h
                          (default 6), OpenCV's recommended 7 px patches and 21 px search window
========================  ==============================================================================

Audio ops (on the decoded mono waveform at the backbone's sample rate, in `AudioPreprocessor.load`):

========================  ==============================================================================
``lowpass=hz``            band-limit to ``hz``: resample to 2·hz and back with soxr (HQ), which keeps what
                          a recording made at that sample rate holds and nothing above it
``bits=n``                quantise to 2^n levels over [-1, 1] (n-bit PCM, e.g. 8 for old game audio)
``loudness[=dbfs]``       scale the clip so that its sounding part (20 ms frames within 40 dB of its loudest
                          frame) has this RMS level (default -20 dBFS), peaks limited to full scale: recordings
                          made at different levels (a quiet microphone, a distant speaker) look alike
========================  ==============================================================================

Band-limiting both the training and the test recordings to what the worst of them contains is how a model
trained on full-band audio copes with low-rate recordings (e.g. 10.5 kHz Pokémon cries vs 32 kHz remasters).

The image ops run on the image after it is shrunk to the model's working size (short side = size / crop_pct,
e.g. 256 px for a 224 px model, 32 px for the from-scratch CNNs), so ``blur=1.0`` means one pixel at the
scale the network sees whatever the photo's resolution, and the costly denoisers stay affordable.

Why OpenCV (opencv-python-headless, numpy its only dependency) for bilateral and non-local means: measured
on a 341x256 photo on this project's 2-core machine, OpenCV's NL-means takes 69 ms (21 px search window:
155-209 ms) where a vectorised numpy version with a smaller 11 px window took 483 ms, and its bilateral
filter 9 ms against 89 ms; scikit-image's versions are slower still and pull in more packages. It is
imported only when one of these two ops is used.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable, Sequence

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from classforge.core.errors import ClassforgeError

# name -> (default value or None when the op takes no value, whether a value is required)
OPS: dict[str, tuple[float | None, bool]] = {
    "autocontrast": (0.0, False),
    "equalize": (None, False),
    "gamma": (None, True),
    "blur": (1.0, False),
    "bilateral": (30.0, False),
    "nlmeans": (6.0, False),
}
AUDIO_OPS: dict[str, tuple[float | None, bool]] = {"lowpass": (None, True), "bits": (None, True),
                                                   "loudness": (-20.0, False)}
ALL_OPS = {**OPS, **AUDIO_OPS}
NEEDS_OPENCV = ("bilateral", "nlmeans")


def parse_ops(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """"autocontrast,gamma=0.8" or "autocontrast+gamma=0.8" or a list -> canonical ("autocontrast", "gamma=0.8").
    "none" / "" / None -> (). Unknown names and bad values raise ClassforgeError."""
    if spec is None:
        return ()
    items = spec if isinstance(spec, (list, tuple)) else str(spec).replace("+", ",").split(",")
    out = []
    for item in items:
        item = str(item).strip()
        if not item or item.lower() == "none":
            continue
        name, _, value = item.partition("=")
        name = name.strip().lower()
        if name not in ALL_OPS:
            close = difflib.get_close_matches(name, list(ALL_OPS), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ClassforgeError(f"Unknown preprocessing op {name!r}.{hint} Known: images {', '.join(OPS)}; "
                                  f"audio {', '.join(AUDIO_OPS)}")
        default, required = ALL_OPS[name]
        if default is None and not required:
            if value.strip():
                raise ClassforgeError(f"--preprocess {name} takes no value (got {item!r})")
            out.append(name)
            continue
        if not value.strip():
            if required:
                raise ClassforgeError(f"--preprocess {name} needs a value, e.g. {name}=0.8")
            out.append(name)
            continue
        try:
            v = float(value)
        except ValueError:
            raise ClassforgeError(f"--preprocess {item!r}: {value!r} is not a number") from None
        _check_value(name, v)
        out.append(f"{name}={v:g}")
    return tuple(out)


def _check_value(name: str, v: float) -> None:
    ok = {"autocontrast": 0 <= v < 50, "gamma": v > 0, "blur": v >= 0, "bilateral": v > 0, "nlmeans": v > 0,
          "lowpass": v >= 50, "bits": 1 <= v <= 24 and v == int(v), "loudness": -60 <= v <= 0}
    if not ok.get(name, True):
        rule = {"autocontrast": "0 <= cut < 50 (percent)", "gamma": "g > 0", "blur": "sigma >= 0",
                "bilateral": "sigma > 0", "nlmeans": "h > 0", "lowpass": "hz >= 50",
                "bits": "a whole number of bits, 1-24", "loudness": "-60 <= dBFS <= 0"}[name]
        raise ClassforgeError(f"--preprocess {name}={v:g}: needs {rule}")


def ops_label(ops: Sequence[str]) -> str:
    """Canonical one-token label: "none" or "autocontrast+gamma=0.8" (used in compare tables and run names)."""
    return "+".join(ops) if ops else "none"


def _value(op: str) -> float | None:
    name, _, v = op.partition("=")
    return float(v) if v else ALL_OPS[name][0]


def set_loudness(wave: np.ndarray, sample_rate: int, dbfs: float) -> np.ndarray:
    """Scale to an RMS of `dbfs` over the sounding frames (20 ms, within 40 dB of the loudest); peak <= 1.
    Digital silence stays silent."""
    hop = max(1, int(0.02 * sample_rate))
    n = len(wave) // hop
    frames = wave[: n * hop].reshape(n, hop) if n else wave.reshape(1, -1)
    rms = np.sqrt(np.mean(np.square(frames, dtype=np.float64), axis=1))
    if rms.size == 0 or rms.max() <= 1e-8:
        return wave
    sounding = rms[rms >= rms.max() * 0.01]  # -40 dB
    level = float(np.sqrt(np.mean(np.square(sounding))))
    gain = 10 ** (dbfs / 20) / level
    peak = float(np.abs(wave).max()) * gain
    if peak > 1.0:
        gain /= peak
    return wave * gain


def apply_audio_ops(wave: np.ndarray, sample_rate: int, ops: Iterable[str]) -> np.ndarray:
    """Apply canonical audio ops to a mono float32 waveform at `sample_rate`, left to right."""
    for op in ops:
        name = op.partition("=")[0]
        v = _value(op)
        if name == "lowpass":
            low = int(round(2 * v))
            if low < sample_rate:  # a band limit at or above Nyquist changes nothing
                import soxr

                n = len(wave)
                wave = soxr.resample(soxr.resample(wave, sample_rate, low, quality="HQ"), low, sample_rate,
                                     quality="HQ")
                wave = np.pad(wave, (0, max(0, n - len(wave))))[:n]  # same length as before
        elif name == "bits":
            levels = 2 ** (int(v) - 1)
            wave = np.round(np.clip(wave, -1.0, 1.0) * levels) / levels
        elif name == "loudness":
            wave = set_loudness(wave, sample_rate, v)
        else:
            raise ClassforgeError(f"--preprocess {name} is an image operation; this is an audio backbone")
    return np.ascontiguousarray(wave, dtype=np.float32)


def apply_ops(img: Image.Image, ops: Iterable[str]) -> Image.Image:
    """Apply canonical ops (from `parse_ops`) to an RGB image, left to right."""
    for op in ops:
        name = op.partition("=")[0]
        v = _value(op)
        if name == "autocontrast":
            img = ImageOps.autocontrast(img, cutoff=v or 0, preserve_tone=True)
        elif name == "equalize":
            y, cb, cr = img.convert("YCbCr").split()
            img = Image.merge("YCbCr", (ImageOps.equalize(y), cb, cr)).convert("RGB")
        elif name == "gamma":
            lut = [min(255, round(255 * (i / 255) ** v)) for i in range(256)]
            img = img.point(lut * len(img.getbands()))
        elif name == "blur":
            img = img.filter(ImageFilter.GaussianBlur(radius=v)) if v > 0 else img
        elif name == "bilateral":
            cv2 = _cv2(name)
            a = np.ascontiguousarray(np.asarray(img.convert("RGB")))
            img = Image.fromarray(cv2.bilateralFilter(a, 5, float(v), 3.0))
        elif name == "nlmeans":
            cv2 = _cv2(name)
            bgr = np.ascontiguousarray(np.asarray(img.convert("RGB"))[:, :, ::-1])  # OpenCV's Lab conversion wants BGR
            out = cv2.fastNlMeansDenoisingColored(bgr, None, float(v), float(v), 7, 21)
            img = Image.fromarray(np.ascontiguousarray(out[:, :, ::-1]))
        else:  # pragma: no cover - parse_ops rejects unknown names
            raise ClassforgeError(f"Unknown preprocessing op {name!r}")
    return img


def _cv2(op: str):
    try:
        import cv2
    except ImportError:
        raise ClassforgeError(f"--preprocess {op} needs OpenCV: pip install opencv-python-headless "
                              "(or classforge[preprocess])") from None
    return cv2


def check_available(ops: Sequence[str]) -> None:
    for op in ops:
        name = op.partition("=")[0]
        if name in NEEDS_OPENCV:
            _cv2(name)


def attach_ops(backbone, spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """Put the ops into the backbone's InputSpec, from where they reach model.json, the embedding-cache key
    and every preprocessor built from the spec (training, evaluation, Predictor, server)."""
    ops = parse_ops(spec)
    if not ops:
        return ops
    task = backbone.spec.task
    own = AUDIO_OPS if task == "audio" else OPS
    wrong = [op for op in ops if op.partition("=")[0] not in own]
    if wrong:
        raise ClassforgeError(f"--preprocess {', '.join(wrong)}: not an {task} operation; {task} ops are "
                              f"{', '.join(own)}")
    check_available(ops)
    backbone.spec = dataclasses.replace(backbone.spec, preprocess=ops)
    return ops
