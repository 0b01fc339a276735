"""Per-file work on one torch thread: small tensor ops on the intra-op pool stall when another process holds a core."""

from __future__ import annotations

import threading

import torch

_thread_state = threading.local()


def one_torch_thread() -> None:
    """Decoding and resizing run one request per thread, many threads at once; intra-op threads on top of that
    only fight for the cores. OpenMP's thread count is per thread, so the model's forward pass (batcher thread)
    keeps its own."""
    if not getattr(_thread_state, "single", False):
        torch.set_num_threads(1)
        _thread_state.single = True
