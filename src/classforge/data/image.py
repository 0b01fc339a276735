"""Image decoding and transforms. The same `load_image` + eval transform serve training, evaluation and
prediction, so a served model preprocesses exactly as the evaluated one did."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

from classforge.core.errors import BadFile
from classforge.core.spec import InputSpec
from classforge.data.ops import apply_ops

if TYPE_CHECKING:  # torch is imported where tensors are made: the file check runs while torch still loads
    import torch

__all__ = ["BadFile", "open_image"]


_INTERP = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


def open_image(src, max_pixels: int = 89_478_485, draft: int = 0) -> Image.Image:
    """Decode fully (so truncation is detected now), honour EXIF rotation, flatten alpha onto white, RGB.
    `draft`: let JPEG decode at a reduced scale (DCT scaling) as long as both sides stay >= draft pixels."""
    return decode_image(src, max_pixels, draft)[0]


def decode_image(src, max_pixels: int = 89_478_485, draft: int = 0) -> tuple[Image.Image, str]:
    """open_image, and the format of the file it decoded ("" for an image or array given in memory)."""
    if isinstance(src, Image.Image):
        return _as_rgb(src, own=False), ""
    if is_array(src):
        return _as_rgb(array_to_image(src), own=False), ""  # its pixels may be the caller's array
    if isinstance(src, (bytes, bytearray)):
        if len(src) == 0:
            raise BadFile("empty file (0 bytes)")
        fp = io.BytesIO(src)
    else:
        p = Path(src)
        if p.stat().st_size == 0:
            raise BadFile("empty file (0 bytes)")
        fp = p
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(fp)
            w, h = img.size
            if w * h > max_pixels:
                raise BadFile(f"too many pixels ({w}x{h} = {w * h / 1e6:.1f} MP > {max_pixels / 1e6:.1f} MP "
                              "limit; possible decompression bomb)")
            if draft and img.format == "JPEG":
                img.draft("RGB", (draft, draft))
            img.load()
        except BadFile:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise BadFile(f"decompression bomb: {e}") from None
        except Image.UnidentifiedImageError:
            raise BadFile("not an image (unrecognised format)") from None
        except (OSError, SyntaxError, ValueError) as e:
            msg = str(e)
            if "truncated" in msg:
                raise BadFile("truncated image (file ends before the image data does)") from None
            raise BadFile(f"cannot decode image: {msg}") from None
    return _as_rgb(img, own=True), img.format or ""


def _as_rgb(img: Image.Image, own: bool) -> Image.Image:
    """EXIF rotation applied, 16-bit and float greyscale scaled to 8 bits, alpha flattened onto white, RGB. An
    image this module decoded (`own`) is rotated in place and returned as it is when already RGB: a copy of a
    photo costs about as much as a third of decoding it. A caller's image is never changed."""
    try:
        rotated = ImageOps.exif_transpose(img, in_place=True) if own else ImageOps.exif_transpose(img)
        img = img if rotated is None else rotated
    except Exception:  # noqa: BLE001 - a broken EXIF block should not lose the image
        pass
    if img.mode.startswith(("I", "F")):
        img = to_8bit(img)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img)
    return img if img.mode == "RGB" and own else img.convert("RGB")


def is_array(x) -> bool:
    return isinstance(x, np.ndarray) or type(x).__module__ == "torch" and hasattr(x, "numpy")


def array_to_image(a) -> Image.Image:
    """A numpy image (H, W) or (H, W, C) with C = 1, 3 or 4, or a torch tensor (C, H, W) as torchvision holds
    images, as a PIL image. uint8 is taken as is; floats in [0, 1] are scaled by 255 (other floats by their own
    range); uint16 by its full range."""
    if not isinstance(a, np.ndarray):
        a = a.detach().cpu().numpy()
        if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
            a = a.transpose(1, 2, 0)  # torch's (C, H, W)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)) or 0 in a.shape:
        raise BadFile(f"an image array must be (H, W) or (H, W, 3|4) (a tensor (3, H, W)), not {tuple(a.shape)}")
    if a.dtype == np.uint8:
        out = a
    elif a.dtype == np.uint16:
        out = np.clip(np.rint(a.astype(np.float32) / 257.0), 0, 255).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer) or a.dtype == bool:
        f = np.nan_to_num(a.astype(np.float32))
        lo, hi = float(f.min()), float(f.max())
        f = f * 255.0 if lo >= 0.0 and hi <= 1.0 else (f - lo) / max(hi - lo, 1e-12) * 255.0
        out = np.clip(np.rint(f), 0, 255).astype(np.uint8)
    else:
        raise BadFile(f"cannot read an image array of dtype {a.dtype}")
    return Image.fromarray(np.ascontiguousarray(out), mode={2: "L", 3: "RGB", 4: "RGBA"}[out.ndim if out.ndim == 2
                                                                                       else out.shape[-1]])


def to_8bit(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float greyscale images as 8-bit greyscale, scaled by their real range:
    Pillow's own convert() clips them at 255, which turns a 16-bit photo almost entirely white (and a float
    image in [0, 1] black). 16-bit modes use their full 0-65535 range; 32-bit integers the 16-bit range when
    their values exceed 255; floats [0, 1] when they lie within it, else their own minimum and maximum."""
    a = np.asarray(img)
    if img.mode.startswith("I;16"):
        scaled = a.astype(np.float32) / 257.0
    elif img.mode == "F":
        a = np.nan_to_num(a.astype(np.float32))
        lo, hi = float(a.min()), float(a.max())
        if lo >= 0.0 and hi <= 1.0:
            scaled = a * 255.0
        else:
            scaled = (a - lo) / max(hi - lo, 1e-12) * 255.0
    else:  # "I": 32-bit integers, often a 16-bit image in disguise
        a = a.astype(np.float64)
        scaled = a / 257.0 if a.max() > 255 else a
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def resize_for_cache(img: Image.Image, spec: InputSpec) -> Image.Image:
    """Shrink large images once so that the in-memory cache stays small (short side = size / crop_pct)."""
    target = int(round(spec.size / spec.crop_pct))
    w, h = img.size
    if min(w, h) <= target:
        return img
    s = target / min(w, h)
    return img.resize((max(1, round(w * s)), max(1, round(h * s))), _INTERP.get(spec.interpolation, Image.BICUBIC))


def enlarge_short_side(img: Image.Image, target: int) -> Image.Image:
    """Bilinear enlargement to the sizes torchvision's Resize(target) picks (the long side truncated, not
    rounded). Pillow's bilinear enlargement matches torchvision's to one grey level, without importing
    torchvision (seconds) for the few images smaller than the model's input."""
    w, h = img.size
    new = (target, int(target * h / w)) if w <= h else (int(target * w / h), target)
    return img.resize(new, Image.BILINEAR)


def eval_transform(spec: InputSpec):
    """Resize short side to size/crop_pct, centre crop to size, normalise. Returns a callable PIL -> (3,H,W)."""
    import torch
    from torchvision.transforms import v2 as T

    interp = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}.get(
        spec.interpolation, T.InterpolationMode.BICUBIC)
    resize = int(round(spec.size / spec.crop_pct))
    return T.Compose([
        T.ToImage(),
        T.Resize(resize, interpolation=interp, antialias=True),
        T.CenterCrop(spec.size),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(spec.mean, spec.std),
    ])


def small_image(spec: InputSpec) -> bool:
    """Inputs of from-scratch CNNs (32x32 CIFAR-like, no centre-crop margin)."""
    return spec.task == "image" and spec.crop_pct == 1.0 and spec.size <= 64


def resolve_augment(spec: InputSpec, level: str) -> str:
    """'light' on small images means the CIFAR recipe (pad + random crop + flip): random-resized crops of
    32x32 images throw away too much of an already tiny image."""
    return "cifar" if level == "light" and small_image(spec) else level


def train_transform(spec: InputSpec, level: str = "light"):
    """Random resized crop + flip (light); plus colour jitter and RandomAffine (strong); none = eval;
    cifar = eval geometry, zero-pad size/8, random crop back to size, flip (default for small images)."""
    import torch
    from torchvision.transforms import v2 as T

    level = resolve_augment(spec, level)
    if level == "none":
        return eval_transform(spec)
    if level == "cifar":
        interp = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}.get(
            spec.interpolation, T.InterpolationMode.BICUBIC)
        return T.Compose([T.ToImage(), T.Resize(int(round(spec.size / spec.crop_pct)), interpolation=interp,
                                                 antialias=True), T.CenterCrop(spec.size),
                          T.RandomCrop(spec.size, padding=max(1, spec.size // 8)), T.RandomHorizontalFlip(),
                          T.ToDtype(torch.float32, scale=True), T.Normalize(spec.mean, spec.std)])
    interp = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}.get(
        spec.interpolation, T.InterpolationMode.BICUBIC)
    ops = [T.ToImage(), T.RandomResizedCrop(spec.size, scale=(0.5 if level == "light" else 0.25, 1.0),
                                            interpolation=interp, antialias=True),
           T.RandomHorizontalFlip()]
    if level == "strong":
        ops += [T.ColorJitter(0.3, 0.3, 0.3, 0.05), T.RandomAffine(degrees=15, translate=(0.1, 0.1), shear=8)]
    elif level == "light":
        ops += [T.ColorJitter(0.1, 0.1, 0.1)]
    ops += [T.ToDtype(torch.float32, scale=True), T.Normalize(spec.mean, spec.std)]
    return T.Compose(ops)


def phash(img: Image.Image, n: int = 64, k: int = 16) -> int:
    """255-bit perceptual hash: signs (vs the median) of the k x k lowest DCT frequencies of an n x n grey
    image, DC left out. Measured: resized/re-encoded copies of noisy images differ by 2-18 bits, different
    images by >= 24 (sklearn digits: 0.1th percentile 58), so near duplicates are found without merging
    two different handwritten 3s."""
    from scipy.fft import dctn

    g = np.asarray(img.convert("L").resize((n, n), Image.BILINEAR), dtype=np.float32)
    d = dctn(g, norm="ortho")[:k, :k].flatten()[1:]
    bits = d > np.median(d)
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def normalised_levels(spec: InputSpec) -> np.ndarray:
    """(3, 256) float32: what each 8-bit level of each channel becomes, by the float32 arithmetic of
    torchvision's ToDtype(scale=True) + Normalize (x * (1/255), then (x - mean) / std). Looking a pixel up here
    gives the same bits as computing it."""
    levels = np.arange(256, dtype=np.float32)[:, None] * np.float32(1.0 / 255)
    mean = np.broadcast_to(np.asarray(spec.mean, dtype=np.float32), (3,))
    std = np.broadcast_to(np.asarray(spec.std, dtype=np.float32), (3,))
    return np.ascontiguousarray(((levels - mean) / std).T)


class ImagePreprocessor:
    """load(src) -> RGB PIL image (shrunk once for the in-memory cache); eval(raw)/train(raw) -> (3,H,W)."""

    def __init__(self, spec: InputSpec, augment: str = "none", max_pixels: int = 89_478_485, kept=None, **_):
        self.spec = spec
        self.kept = kept  # data.kept.KeptImages: files the check already decoded
        self.augment = resolve_augment(spec, augment)
        self.max_pixels = max_pixels
        self._augment_level = augment
        self._levels = normalised_levels(spec)
        self._eval_tf = self._train_tf = None  # torchvision pipelines, built on first use (importing it takes seconds)

    def warm_up(self) -> None:
        """Build the eval pipeline now (a server's first request should not pay for importing torchvision)."""
        _ = self._eval

    @property
    def _eval(self):
        if self._eval_tf is None:
            self._eval_tf = eval_transform(self.spec)
        return self._eval_tf

    @property
    def _train(self):
        if self._train_tf is None:
            self._train_tf = train_transform(self.spec, self._augment_level)
        return self._train_tf

    def load(self, src) -> Image.Image:
        target = int(round(self.spec.size / self.spec.crop_pct))
        img = self._kept(src, target)
        if img is None:
            img = open_image(src, self.max_pixels, draft=target)
        img = resize_for_cache(img, self.spec)
        if self.spec.preprocess:  # --preprocess ops: here, so training, evaluation and predict all apply them
            img = apply_ops(img, self.spec.preprocess)
        return img

    def _kept(self, src, target: int) -> Image.Image | None:
        """The file's image as the check decoded it (fully), where that is what open_image(draft=target) gives:
        a JPEG is decoded at a reduced scale only when both sides are at least twice the target."""
        if self.kept is None or not isinstance(src, (str, Path)):
            return None
        img = self.kept.take(str(src))
        if img is None or min(img.size) >= 2 * target:
            return None
        return img

    def eval(self, raw: Image.Image) -> torch.Tensor:
        """Eval view (3, H, W): made in numpy where `eval_array` can, else by the torchvision pipeline."""
        raw = self._enlarged(raw)
        x = self._cropped_and_normalised(raw)
        if x is None:
            return self._eval(raw)
        import torch

        return torch.from_numpy(x)

    def eval_array(self, raw) -> np.ndarray | None:
        """Eval view as a float32 (3, H, W) array, without torch; None where only torchvision makes it."""
        return self._cropped_and_normalised(self._enlarged(raw))

    def _enlarged(self, raw):
        """An image smaller than the model's input, enlarged to it as torchvision's Resize would (bilinear)."""
        target = int(round(self.spec.size / self.spec.crop_pct))
        if isinstance(raw, Image.Image) and min(raw.size) < target and self.spec.interpolation == "bilinear":
            return enlarge_short_side(raw, target)
        return raw

    def _cropped_and_normalised(self, raw) -> np.ndarray | None:
        """`load` already shrank the short side to size/crop_pct, so usually only the centre crop and the
        normalisation remain: done here on the uint8 array, with the same crop offsets as the torchvision pipeline
        (whose resize is then a no-op) and values from `normalised_levels`, in numpy: no small ops on torch's
        thread pool, which stall when another process holds a core. None for other sizes and modes."""
        target, size = int(round(self.spec.size / self.spec.crop_pct)), self.spec.size
        if not isinstance(raw, Image.Image) or raw.mode != "RGB" or min(raw.size) != target:
            return None
        w, h = raw.size
        if w < size or h < size:
            return None
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
        crop = np.asarray(raw)[top:top + size, left:left + size]  # (H, W, 3) uint8
        x = np.empty((3, size, size), np.float32)
        for c in range(3):  # each channel's plane looked up from its 256 values: no float pass over the image
            np.take(self._levels[c], crop[..., c], out=x[c], mode="clip")
        return x

    def train(self, raw: Image.Image) -> torch.Tensor:
        return self._train(raw)
