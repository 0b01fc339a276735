"""One bound on the memory that decoding takes across all requests at once.

Each request is limited on its own (bytes, files, pixels per image), but sixteen requests with one 40-MP PNG each
would still decode 16 x 120 MB of pixels at the same time. Before a file is decoded it reserves what its header
says the decoded image (or waveform) will take; a request that cannot get its share within `wait_s` is answered
503 with Retry-After, and the server keeps serving the others."""

from __future__ import annotations

import ctypes
import io
import threading
import time
from contextlib import contextmanager

DECODED_BYTES_PER_PIXEL = 8  # RGB uint8 plus the conversion and resize copies that coexist with it


TRIM_AFTER_BYTES = 64 * 2**20  # after a decode this large, freed memory goes back to the system


def return_freed_memory() -> None:
    """glibc keeps freed heap memory in per-thread arenas (Pillow's 16 MB image blocks land there): a burst of
    large decodes, each on its own server thread, would leave one decoded image's worth of memory in every
    thread's arena. malloc_trim gives the free pages back to the system.
    A no-op where the C library has no malloc_trim."""
    global _trim
    if _trim is None:
        try:
            _trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _trim = False
    if _trim:
        _trim(0)


_trim = None


class Busy(Exception):
    """The decode budget stayed full for the whole wait."""


class DecodeBudget:
    def __init__(self, max_bytes: int, wait_s: float = 10.0):
        self.max_bytes, self.wait_s = int(max_bytes), float(wait_s)
        self.in_use = 0
        self.peak = 0
        self.refused = 0
        self._cond = threading.Condition()

    @contextmanager
    def reserve(self, nbytes: int):
        # one file larger than the whole budget still decodes, alone (the per-file limits bound it)
        nbytes = min(int(nbytes), self.max_bytes)
        deadline = time.monotonic() + self.wait_s
        with self._cond:
            while self.in_use + nbytes > self.max_bytes:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.refused += 1
                    raise Busy()
                self._cond.wait(left)
            self.in_use += nbytes
            self.peak = max(self.peak, self.in_use)
        try:
            yield
        finally:
            if nbytes >= TRIM_AFTER_BYTES:
                return_freed_memory()  # before the share is handed on: the next decode reuses the pages
            with self._cond:
                self.in_use -= nbytes
                self._cond.notify_all()

    def stats(self) -> dict:
        return {"max_mb": round(self.max_bytes / 2**20, 1), "in_use_mb": round(self.in_use / 2**20, 1),
                "peak_mb": round(self.peak / 2**20, 1), "refused": self.refused}


def decoded_size(data: bytes, task: str) -> int:
    """Bytes the decoded file will take, from its header alone; the raw size when the header says nothing (the
    decoder then reports what is wrong)."""
    try:
        if task == "image":
            from PIL import Image

            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size
                return w * h * DECODED_BYTES_PER_PIXEL
        import soundfile as sf

        info = sf.info(io.BytesIO(data))
        return info.frames * max(1, info.channels) * 4 * 2  # float32 samples, plus the resampled copy
    except Exception:  # noqa: BLE001 - unreadable header: the decoder says why
        return len(data)
