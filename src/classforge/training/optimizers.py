"""Optimisers by name. `--optimizer NAME` picks an entry; an entry builds the torch optimiser from the module's
parameter groups (input to output, the head last) and may split them first. Built in: adamw and sgd; others
register from outside the product (the CIFAR-10 benchmark registers its Muon variant this way)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from classforge.core.errors import ClassforgeError


@dataclass(frozen=True)
class OptimizerSettings:
    lr: float  # the head's learning rate
    momentum: float
    weight_decay: float
    args: dict[str, Any] = field(default_factory=dict)  # the entry's own options (config key optimizer_args)


@dataclass
class OptimizerEntry:
    name: str
    build: Callable[[list[dict], OptimizerSettings], torch.optim.Optimizer]
    # SGD-like steps: the default learning rate is 0.05 and AdamW's 0.05 weight decay becomes 5e-4 (L2)
    sgd_like: bool = False
    # (group index, is the head, weight matrices, group lr, settings) -> groups for the matrices, or None for
    # the usual one group; lets an entry treat the backbone's matrices differently
    matrix_groups: Callable[[int, bool, list, float, OptimizerSettings], list[dict] | None] | None = None
    check: Callable[[dict], None] | None = None  # validates `args` before training starts
    description: str = ""


_OPTIMIZERS: dict[str, OptimizerEntry] = {}


def register_optimizer(entry: OptimizerEntry) -> OptimizerEntry:
    _OPTIMIZERS[entry.name] = entry
    return entry


def optimizer_names() -> list[str]:
    return list(_OPTIMIZERS)


def get_optimizer(name: str) -> OptimizerEntry:
    if name not in _OPTIMIZERS:
        close = difflib.get_close_matches(name, list(_OPTIMIZERS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ClassforgeError(f"--optimizer must be auto or one of {', '.join(_OPTIMIZERS)}, not {name!r}.{hint}")
    return _OPTIMIZERS[name]


def _sgd(groups: list[dict], s: OptimizerSettings) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=s.lr, momentum=s.momentum, nesterov=s.momentum > 0, weight_decay=s.weight_decay)


def _adamw(groups: list[dict], s: OptimizerSettings) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=s.lr, weight_decay=s.weight_decay)


register_optimizer(OptimizerEntry("adamw", _adamw, description="AdamW (decoupled weight decay)"))
register_optimizer(OptimizerEntry("sgd", _sgd, sgd_like=True, description="SGD with Nesterov momentum"))
