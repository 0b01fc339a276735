"""Decoding and preprocessing files in worker threads, a bounded number of batches ahead of the forward pass.

Per-file work (decode, resize, normalise, stacking a batch) runs in the workers on ONE torch thread each: small
tensor ops on the shared intra-op pool wait at every barrier for a sibling thread that another process has
descheduled, so on a busy machine they cost a thousand times their quiet time. Only the batched forward pass, in
the caller's thread, uses all cores."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from typing import Any

from classforge.runtime.threads import one_torch_thread

PREFETCH = 4  # decoded batches kept ahead of the forward pass


def decode_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def decoded_batches(items: Sequence[Any], load_batch: Callable[[list[Any]], Any], batch_size: int,
                    workers: int | None = None, prefetch: int = PREFETCH, before: Callable[[], None] | None = None
                    ) -> Iterator[tuple[list[Any], Any]]:
    """Yield (batch items, load_batch(batch items)) in order. load_batch runs in worker threads on one torch
    thread; at most `prefetch` batches wait in memory. `before` runs in the caller once the first batches are
    decoding (e.g. building an engine)."""
    chunks = iter([list(items[i:i + batch_size]) for i in range(0, len(items), batch_size)])

    def work(chunk: list[Any]):
        one_torch_thread()
        return chunk, load_batch(chunk)

    with ThreadPoolExecutor(max_workers=workers or decode_workers()) as pool:
        pending = deque(pool.submit(work, ch) for ch in islice(chunks, prefetch))
        if before is not None:
            before()
        while pending:
            done = pending.popleft().result()
            nxt = next(chunks, None)
            if nxt is not None:
                pending.append(pool.submit(work, nxt))
            yield done
