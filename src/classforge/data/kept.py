"""Images decoded while checking files, kept in memory (bounded) for the first pass that needs them.

Checking a file decodes it completely, and a linear run then decodes every file again for its embedding. The
check hands each decoded image to a `KeptImages`; the preprocessor's `load` takes it from there (once) instead of
decoding the file a second time. Only what the second decode would give is used: a JPEG large enough that the
preprocessor decodes it at a reduced DCT scale is decoded again."""

from __future__ import annotations

import threading

from PIL import Image

KEEP_MB = 384  # decoded pixels held at once; files past the budget are decoded again when needed
MAX_KEPT_PIXELS = 4_000_000  # larger images are decoded at a reduced scale for most models: not worth holding


class KeptImages:
    """path -> decoded RGB image, up to `max_mb` of pixels; `take` hands an image out once and frees its bytes.
    An image can also be held as raw bytes (`offer_spooled`: pixels another process decoded), made into an
    image when taken."""

    def __init__(self, max_mb: float = KEEP_MB):
        self.max_bytes = int(max_mb * 2**20)
        self.used = 0
        self._images: dict[str, Image.Image | _Raw] = {}
        self._lock = threading.Lock()
        self.stats = {"kept": 0, "taken": 0, "over_budget": 0}

    def offer(self, path: str, img: Image.Image) -> None:
        if img.width * img.height > MAX_KEPT_PIXELS:
            return
        self._hold(path, img)

    def offer_spooled(self, path: str, pixels: memoryview, mode: str, size: tuple[int, int]) -> None:
        """Hold raw `mode` pixels (a view of memory shared with the process that decoded them)."""
        if size[0] * size[1] <= MAX_KEPT_PIXELS and len(pixels) == size[0] * size[1] * len(mode):
            self._hold(path, _Raw(pixels, mode, size))

    def _hold(self, path: str, item: Image.Image | _Raw) -> None:
        size = held_bytes(item)
        with self._lock:
            if self.used + size > self.max_bytes:
                self.stats["over_budget"] += 1
                return
            self._images[path] = item
            self.used += size
            self.stats["kept"] += 1

    def take(self, path: str) -> Image.Image | None:
        with self._lock:
            item = self._images.pop(path, None)
            if item is None:
                return None
            self.used -= held_bytes(item)
            self.stats["taken"] += 1
        return item.image() if isinstance(item, _Raw) else item

    def clear(self) -> None:
        with self._lock:
            self._images.clear()
            self.used = 0

    def __len__(self) -> int:
        return len(self._images)


class _Raw:
    """Pixels as bytes, row by row (Pillow's "raw" layout of `mode`)."""

    def __init__(self, pixels: memoryview, mode: str, size: tuple[int, int]):
        self.pixels, self.mode, self.size = pixels, mode, size

    def image(self) -> Image.Image:
        return Image.frombytes(self.mode, self.size, self.pixels)  # a copy: the image outlives the mapping


def held_bytes(img: Image.Image | _Raw) -> int:
    """Memory a decoded image holds: Pillow keeps images of 2 to 4 bands in 4 bytes per pixel; raw pixels take
    their own size."""
    if isinstance(img, _Raw):
        return len(img.pixels)
    return img.width * img.height * (1 if len(img.getbands()) == 1 else 4)
