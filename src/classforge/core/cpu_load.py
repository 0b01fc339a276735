"""How many cores other processes keep busy, from /proc/stat, with this process's own CPU time left out.

CPU time of child processes doing this process's work (`count_as_own`) counts as its own, not as other load.

The command line takes a first reading before it imports its libraries (`note_start`), so that the first
`busy_cores()` of a run measures over those seconds instead of sleeping to measure."""

from __future__ import annotations

import os
import time

# the last reading of this process: (monotonic s, busy ticks, total ticks, own CPU s)
_last_reading: tuple[float, int, int, float] | None = None
_own_children: set[int] = set()


def count_as_own(pid: int) -> None:
    """Count the CPU time of child process `pid` (started to do this process's work) as this process's own."""
    _own_children.add(pid)


def stop_counting(pid: int) -> None:
    """`pid` has been waited for: its CPU time is now in os.times()'s children's time."""
    _own_children.discard(pid)


def own_cpu_s() -> float:
    """CPU seconds of this process, of the children it has waited for, and of the running ones that count as
    its own."""
    t = os.times()
    return time.process_time() + t.children_user + t.children_system + sum(map(_child_cpu_s, list(_own_children)))


def _child_cpu_s(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def note_start() -> None:
    """Read /proc/stat now: the first busy_cores() then measures over the time since."""
    global _last_reading
    _last_reading = _reading()


def busy_cores(interval_s: float = 0.3, read=None, own_time=None) -> float:
    """How many cores other work kept busy over the last `interval_s` or more (this process's own CPU time is
    left out); 0.0 where /proc/stat cannot be read. Measured from this process's previous reading when that is
    between `interval_s` and 30 s old, so it costs no waiting; else over `interval_s` from now. `read` and
    `own_time` replace /proc/stat and the process's CPU clock (tests), and always measure from now."""
    global _last_reading
    if read is None and own_time is None:
        now = _reading()
        before = _last_reading
        if now is not None and (before is None or not interval_s <= now[0] - before[0] <= 30.0):
            time.sleep(interval_s)
            before, now = now, _reading()
        _last_reading = now
        return 0.0 if before is None or now is None else others_busy(before[1:], now[1:])
    read, own_time = read or proc_stat, own_time or own_cpu_s
    try:
        before = (*read(), own_time())
        time.sleep(interval_s)
        after = (*read(), own_time())
    except (OSError, ValueError):
        return 0.0
    return others_busy(before, after)


def others_busy(before: tuple[int, int, float], after: tuple[int, int, float]) -> float:
    """Cores' worth of CPU time that other processes used between two (busy ticks, total ticks, own CPU seconds)
    readings."""
    ticks = after[1] - before[1]
    if ticks <= 0:
        return 0.0
    cores = os.cpu_count() or 1
    elapsed = ticks / cores / os.sysconf("SC_CLK_TCK")  # seconds, from the same ticks
    everyone = (after[0] - before[0]) / ticks * cores  # cores' worth of busy time
    return max(0.0, everyone - (after[2] - before[2]) / elapsed)


def proc_stat() -> tuple[int, int]:
    """(busy ticks, total ticks) of all cores since boot."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values) - idle, sum(values)


def _reading() -> tuple[float, int, int, float] | None:
    try:
        return (time.monotonic(), *proc_stat(), own_cpu_s())
    except (OSError, ValueError):
        return None
