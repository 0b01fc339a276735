"""What a backbone expects as input: the one description shared by preprocessing, the cache key, model.json
and the exported model's metadata."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class InputSpec:
    """What a backbone expects. Images: RGB, resized to `size`, normalised by mean/std.
    Audio: mono waveform at `sample_rate`, `clip_seconds` long (the backbone owns its front end)."""

    task: str  # "image" | "audio"
    size: int = 224  # image side in pixels
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    channels: int = 3
    sample_rate: int = 0  # audio only
    clip_seconds: float = 0.0  # audio only
    preprocess: tuple[str, ...] = ()  # classical image/audio ops run at load time (classforge.data.ops)

    def to_dict(self) -> dict:
        d = asdict(self)
        if not d["preprocess"]:
            del d["preprocess"]  # runs without ops keep their model.json and embedding-cache keys
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "InputSpec":
        d = dict(d)
        for k in ("mean", "std", "preprocess"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})
