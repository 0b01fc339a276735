"""One preprocessor per task, chosen from the backbone's InputSpec: load(src) -> raw, eval(raw), train(raw)."""

from __future__ import annotations

from classforge.core.spec import InputSpec
from classforge.data.image import ImagePreprocessor


def make_preprocessor(spec: InputSpec, augment: str = "none", **kwargs):
    if spec.task == "audio":
        from classforge.data.audio import AudioPreprocessor  # the audio extra (soundfile, soxr)

        keep = {k: v for k, v in kwargs.items() if k in ("background_dir", "snr_db", "seed")}
        return AudioPreprocessor(spec, augment=augment, **keep)
    kwargs = {k: v for k, v in kwargs.items() if k in ("max_pixels", "kept")}
    return ImagePreprocessor(spec, augment=augment, **kwargs)
