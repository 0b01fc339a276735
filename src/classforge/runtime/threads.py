"""Threads on a shared machine: per-file work on one torch thread each (small tensor ops on the intra-op pool stall
when another process holds a core), and batched passes on one thread per core that other work leaves free."""

from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager

_thread_state = threading.local()
# the last /proc/stat reading of this process: (monotonic s, busy ticks, total ticks, own CPU s); torch is imported
# inside the functions, so that the CLI can take the first reading before its imports
_last_reading: tuple[float, int, int, float] | None = None


def one_torch_thread() -> None:
    """Decoding and resizing run one request per thread, many threads at once; intra-op threads on top of that
    only fight for the cores. OpenMP's thread count is per thread, so the model's forward pass (batcher thread)
    keeps its own."""
    if not getattr(_thread_state, "single", False):
        import torch

        torch.set_num_threads(1)
        _thread_state.single = True


def note_start() -> None:
    """Read /proc/stat now (the CLI does at start-up): the first busy_cores() then measures over the seconds
    spent importing instead of sleeping."""
    global _last_reading
    _last_reading = _reading()


def _reading() -> tuple[float, int, int, float] | None:
    try:
        return (time.monotonic(), *_proc_stat(), time.process_time())
    except (OSError, ValueError):
        return None


def busy_cores(interval_s: float = 0.3, read=None, own_time=None) -> float:
    """How many cores other work kept busy over the last `interval_s` or more (this process's own CPU time is
    left out), from /proc/stat; 0.0 where it cannot be read. Measured from this process's previous reading when
    that is between `interval_s` and 30 s old, so it costs no waiting; else over `interval_s` from now."""
    global _last_reading
    if read is None and own_time is None:
        now = _reading()
        before = _last_reading
        if now is not None and (before is None or not interval_s <= now[0] - before[0] <= 30.0):
            time.sleep(interval_s)
            before, now = now, _reading()
        _last_reading = now
        return 0.0 if before is None or now is None else _others_busy(before[1:], now[1:])
    read, own_time = read or _proc_stat, own_time or time.process_time
    try:
        before = (*read(), own_time())
        time.sleep(interval_s)
        after = (*read(), own_time())
    except (OSError, ValueError):
        return 0.0
    return _others_busy(before, after)


def _others_busy(before: tuple[int, int, float], after: tuple[int, int, float]) -> float:
    """Cores' worth of CPU time that other processes used between two (busy ticks, total ticks, own CPU seconds)
    readings."""
    ticks = after[1] - before[1]
    if ticks <= 0:
        return 0.0
    cores = os.cpu_count() or 1
    elapsed = ticks / cores / os.sysconf("SC_CLK_TCK")  # seconds, from the same ticks
    everyone = (after[0] - before[0]) / ticks * cores  # cores' worth of busy time
    return max(0.0, everyone - (after[2] - before[2]) / elapsed)


class BusyWatch:
    """Whether other processes are using the cores right now, kept current by a daemon thread that reads
    /proc/stat every `period_s`. For choices made per request (spin-waiting intra-op threads answer a lone
    request sooner on idle cores, but fight a competing process for its core), where sleeping 0.3 s to measure
    is not an option. `quiet` is False until the first reading and wherever /proc/stat cannot be read."""

    def __init__(self, period_s: float = 0.5, threshold: float = 0.5, read=None, own_time=None):
        self.period_s, self.threshold = period_s, threshold
        self._read, self._own = read or _proc_stat, own_time or time.process_time
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
                self.busy, before = _others_busy(before, after), after
        except (OSError, ValueError):
            self.busy = None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _proc_stat() -> tuple[int, int]:
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values) - idle, sum(values)


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
