"""Backbones by name. Importing this package registers every model family in it: each module here that is not
infrastructure calls `register_backbone`, so a new backbone is one new file. A family whose optional extra is
missing (e.g. transformers for AST) registers what it can and is otherwise skipped."""

from __future__ import annotations

import importlib
import pkgutil

_INFRASTRUCTURE = {"registry", "anatomy", "weights"}


def _register_families() -> None:
    for info in pkgutil.iter_modules(__path__):
        if info.name in _INFRASTRUCTURE or info.name.startswith("_"):
            continue
        try:
            importlib.import_module(f"{__name__}.{info.name}")
        except ImportError as e:  # pragma: no cover - depends on installed extras
            if "classforge" in str(e):
                raise
            continue


_register_families()
