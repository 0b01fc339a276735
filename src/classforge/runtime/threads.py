"""Threads on a shared machine: per-file work on one torch thread each (small tensor ops on the intra-op pool stall
when another process holds a core), and batched passes on one thread per core that other work leaves free."""

from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager

from classforge.core.cpu_load import busy_cores, others_busy, own_cpu_s, proc_stat
from classforge.core.heap import loading_libraries

__all__ = ["BusyWatch", "adapted_threads", "busy_cores", "one_torch_thread", "threads_for_this_machine"]

_thread_state = threading.local()


def one_torch_thread() -> None:
    """Decoding and resizing run one request per thread, many threads at once; intra-op threads on top of that
    only fight for the cores. OpenMP's thread count is per thread, so the model's forward pass (batcher thread)
    keeps its own."""
    if not getattr(_thread_state, "single", False):
        import torch

        torch.set_num_threads(1)
        _thread_state.single = True


class BusyWatch:
    """Whether other processes are using the cores right now, kept current by a daemon thread that reads
    /proc/stat every `period_s`. For choices made per request (spin-waiting intra-op threads answer a lone
    request sooner on idle cores, but fight a competing process for its core), where sleeping 0.3 s to measure
    is not an option. `quiet` is False until the first reading and wherever /proc/stat cannot be read."""

    def __init__(self, period_s: float = 0.5, threshold: float = 0.5, read=None, own_time=None):
        self.period_s, self.threshold = period_s, threshold
        self._read, self._own = read or proc_stat, own_time or own_cpu_s
        self.busy: float | None = None  # other processes' cores over the last period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="classforge-busy-watch", daemon=True)
        self._thread.start()

    @property
    def quiet(self) -> bool:
        return self.busy is not None and self.busy < self.threshold

    def _loop(self) -> None:
        try:
            before = (*self._read(), self._own())
            while not self._stop.wait(self.period_s):
                after = (*self._read(), self._own())
                self.busy, before = others_busy(before, after), after
        except (OSError, ValueError):
            self.busy = None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def threads_for_this_machine(busy: float | None = None) -> tuple[int, str]:
    """Intra-op threads for the batched forward/backward passes: one per core that other work leaves free.
    On a shared machine every OpenMP barrier waits for the thread whose core another process holds, so fewer
    threads than cores run far faster there. Returns (threads, why)."""
    cores = os.cpu_count() or 1
    busy = busy_cores() if busy is None else busy
    taken = min(cores - 1, int(busy + 0.5))
    if taken <= 0:
        return cores, f"{cores} cores free"
    return cores - taken, f"{taken} of {cores} cores busy with other work"


@contextmanager
def adapted_threads(requested: int = 0, say=None, share: int = 1):
    """torch's intra-op threads for a run: `requested`, or one per core that other work leaves free (measured
    now), divided among `share` processes of the run on this machine. The caller's own setting is restored
    afterwards, so a notebook's torch is left as it was."""
    with loading_libraries():  # often the command's first use of torch
        import torch

    before = torch.get_num_threads()
    if requested:
        n, why = requested, "as asked"
    else:
        n, why = threads_for_this_machine()
        if share > 1:
            n, why = max(1, n // share), f"{why}, shared by {share} processes"
        if n < (os.cpu_count() or 1):
            (say or _to_stderr)(f"  {why}: {n} torch thread{'s' if n > 1 else ''} (--threads to choose)")
    torch.set_num_threads(n)
    try:
        yield {"torch": n, "why": why}
    finally:
        torch.set_num_threads(before)


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr)  # stdout may be JSON (`predict --json`)
