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
    """path -> decoded RGB image, up to `max_mb` of pixels; `take` hands an image out once and frees its bytes."""

    def __init__(self, max_mb: float = KEEP_MB):
        self.max_bytes = int(max_mb * 2**20)
        self.used = 0
        self._images: dict[str, Image.Image] = {}
        self._lock = threading.Lock()
        self.stats = {"kept": 0, "taken": 0, "over_budget": 0}

    def offer(self, path: str, img: Image.Image) -> None:
        size = held_bytes(img)
        if img.width * img.height > MAX_KEPT_PIXELS:
            return
        with self._lock:
            if self.used + size > self.max_bytes:
                self.stats["over_budget"] += 1
                return
            self._images[path] = img
            self.used += size
            self.stats["kept"] += 1

    def take(self, path: str) -> Image.Image | None:
        with self._lock:
            img = self._images.pop(path, None)
            if img is not None:
                self.used -= held_bytes(img)
                self.stats["taken"] += 1
            return img

    def clear(self) -> None:
        with self._lock:
            self._images.clear()
            self.used = 0

    def __len__(self) -> int:
        return len(self._images)


def held_bytes(img: Image.Image) -> int:
    """Memory a decoded image holds: Pillow keeps images of 2 to 4 bands in 4 bytes per pixel."""
    return img.width * img.height * (1 if len(img.getbands()) == 1 else 4)
