"""Keep the C allocator from returning freed memory to the OS at every training step (glibc on Linux).

A CPU training step allocates and frees the same large activation and gradient buffers (tens of MB for a
CIFAR batch of 256) every step. glibc serves blocks above its mmap threshold with fresh mmap() pages and
unmaps them on free, and trims the heap top above its trim threshold, so each step page-faults its big tensors
in again. Raising both thresholds (and padding heap growth) lets freed blocks be reused: measured on the
CIFAR-10 recipe here, training images/s rose from about 2,010 to 2,310 (benchmarks/RESULTS.md). The cost is
that the process keeps its peak memory until it exits. Set CLASSFORGE_MALLOC=system to leave glibc's defaults.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc <malloc.h>
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest allowed value on 64-bit (above it, mallopt refuses)
TRIM_THRESHOLD = 1 << 30
TOP_PAD = 256 * 1024 * 1024

_done: bool | None = None


def keep_freed_memory() -> bool:
    """Apply the settings once per process; True when glibc accepted them (False elsewhere or when disabled)."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if not sys.platform.startswith("linux") or os.environ.get("CLASSFORGE_MALLOC", "").lower() == "system":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc: leave it alone
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = all(mallopt(k, v) == 1 for k, v in ((M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                                                 (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD)))
    return _done
