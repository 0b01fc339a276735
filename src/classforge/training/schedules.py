"""Learning-rate schedules as functions of training progress p in [0, 1], not of a fixed epoch count.

Progress is the larger of (optimizer steps done / planned steps) and (seconds trained / time budget), so
under `--time-budget 60m` the schedule stretches to the budget: the step schedule's plateaus fall at 50% and
75% of the budget, cosine reaches zero when the budget runs out, whatever the epoch time turns out to be.
"""

from __future__ import annotations

import math
import time

from classforge.core.errors import ClassforgeError

SCHEDULES = ("cosine", "step", "onecycle", "constant")


def step_factor(p: float) -> float:
    """The course's three plateaus: 1, 1/10, 1/100 of the base LR over 50% / 25% / 25% of the budget
    (0.01 / 0.001 / 0.0001 with the default base LR of the step schedule)."""
    return 1.0 if p < 0.5 else 0.1 if p < 0.75 else 0.01


def cosine_factor(p: float, warmup: float = 0.0) -> float:
    """Linear warm-up over the first `warmup` fraction, then half a cosine down to 0."""
    if p < warmup:
        return max(p / warmup, 1e-3)
    q = (p - warmup) / max(1e-9, 1.0 - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, q)))


def onecycle_factor(p: float, pct_start: float = 0.3, div: float = 25.0, final_div: float = 1e4) -> float:
    """Smith's one-cycle as in torch.optim.lr_scheduler.OneCycleLR (cosine annealing both ways): from
    1/div of the peak up to the peak over `pct_start`, then down to 1/(div*final_div)."""
    lo, end = 1.0 / div, 1.0 / (div * final_div)
    if p < pct_start:
        q = p / pct_start
        return lo + (1.0 - lo) * 0.5 * (1.0 - math.cos(math.pi * q))
    q = min(1.0, (p - pct_start) / max(1e-9, 1.0 - pct_start))
    return end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * q))


def lr_factor(name: str, p: float, warmup: float = 0.0) -> float:
    """Multiplier of the base LR at progress p (clamped to [0, 1])."""
    p = min(1.0, max(0.0, p))
    if name == "step":
        return step_factor(p)
    if name == "cosine":
        return cosine_factor(p, warmup)
    if name == "onecycle":
        return onecycle_factor(p)
    if name == "constant":
        return 1.0
    raise ClassforgeError(f"--schedule must be one of {', '.join(SCHEDULES)}, not {name!r}")


class Progress:
    """How far training has gone: max(steps / total_steps, elapsed / budget_s).

    The clock is the same one Lightning's Timer uses for `max_time` (started at the start of fit, validation
    included), so the LR reaches the end of its schedule as the Timer stops training."""

    def __init__(self, total_steps: int, budget_s: float | None = None, clock=time.monotonic):
        self.total_steps, self.budget_s, self.clock = max(1, int(total_steps)), budget_s, clock
        self.t0: float | None = None
        self.timer = None

    def start(self, timer=None) -> None:
        """Start the clock; with Lightning's Timer callback, read its training time instead (the very clock
        that ends training, and restored from the checkpoint on --resume)."""
        self.t0, self.timer = self.clock(), timer

    def elapsed(self) -> float:
        if self.timer is not None:
            return float(self.timer.time_elapsed("train"))
        return self.clock() - self.t0 if self.t0 is not None else 0.0

    def __call__(self, step: int) -> float:
        p = step / self.total_steps
        if self.budget_s:
            p = max(p, self.elapsed() / self.budget_s)
        return min(1.0, p)


def make_lambda(name: str, progress: Progress, warmup: float = 0.0):
    """A LambdaLR function of the step (a closure, so LambdaLR's state_dict does not pickle the clock)."""
    if name not in SCHEDULES:
        lr_factor(name, 0.0)  # raises the clear error

    def f(step: int) -> float:
        return lr_factor(name, progress(step), warmup)

    return f


def parse_progressive(spec: str, full_size: int) -> list[tuple[float, int]]:
    """`--progressive-resize` "SIZE:UNTIL[,SIZE:UNTIL...]" -> [(until, size), ...], checked: sizes grow and
    stay below the model's input size, UNTIL fractions grow within (0, 1). "" -> [] (off)."""
    how = "--progressive-resize takes SIZE:UNTIL[,SIZE:UNTIL...], e.g. 24:0.5 (24 px for the first half of training)"
    if spec is not None and not isinstance(spec, str):  # e.g. `progressive_resize: 24` in a config file
        raise ClassforgeError(f"{how}; got {spec!r}")
    spec = (spec or "").strip()
    if not spec:
        return []
    plan: list[tuple[float, int]] = []
    for part in spec.split(","):
        try:
            size_s, until_s = part.split(":")
            size, until = int(size_s), float(until_s)
        except ValueError:
            raise ClassforgeError(f"{how}; got {spec!r}") from None
        if not 8 <= size < full_size:
            raise ClassforgeError(f"{how}: each SIZE must be at least 8 and below the model's input size "
                                  f"{full_size}, got {size}")
        if not 0.0 < until < 1.0:
            raise ClassforgeError(f"{how}: each UNTIL is a fraction of training between 0 and 1, got {until}")
        if plan and (until <= plan[-1][0] or size < plan[-1][1]):
            raise ClassforgeError(f"{how}: list the stages in order, with growing SIZE and UNTIL; got {spec!r}")
        plan.append((until, size))
    return plan


def size_at(plan: list[tuple[float, int]], p: float) -> int | None:
    """The training image size at progress p under a parse_progressive plan (None: the full size)."""
    for until, size in plan:
        if p < until:
            return size
    return None
