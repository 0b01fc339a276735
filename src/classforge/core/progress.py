"""Progress on every long step, on stderr: a live bar on a terminal, and when the step ends one line that stays
(what it did, how long it took, how fast). In logs and pipes only the summary line is written, so a CI log is
not filled with carriage returns. Quiet when CLASSFORGE_QUIET=1."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator

from tqdm.auto import tqdm


def quiet() -> bool:
    return os.environ.get("CLASSFORGE_QUIET") == "1"


class Progress:
    """Iterate over it, or call update(n) and close(). `summary` (default True) writes the closing line."""

    def __init__(self, iterable: Iterable | None, total: int | None = None, desc: str = "", unit: str = "file",
                 summary: bool = True):
        self.iterable, self.total, self.desc, self.unit, self.summary = iterable, total, desc, unit, summary
        self.done, self.t0, self.closed = 0, time.perf_counter(), False
        live = not quiet() and sys.stderr.isatty()
        self.bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not live, dynamic_ncols=True,
                        leave=False)

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __len__(self) -> int:
        return self.total or 0

    def update(self, n: int = 1) -> None:
        self.done += n
        self.bar.update(n)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.bar.close()
        if self.summary and self.done and not quiet():
            print(summary_line(self.desc, self.done, self.unit, time.perf_counter() - self.t0), file=sys.stderr)


def summary_line(desc: str, n: int, unit: str, seconds: float) -> str:
    units = unit if n == 1 else f"{unit}s"
    rate = f" ({n / seconds:,.0f} {unit}s/s)" if seconds > 0 and n > 1 else ""
    return f"{desc}: {n:,} {units} in {seconds:.1f} s{rate}"


def progress(iterable, total: int | None = None, desc: str = "", unit: str = "file") -> Progress:
    return Progress(iterable, total=total, desc=desc, unit=unit)
