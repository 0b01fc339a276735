"""Python's garbage collector while classforge loads its libraries.

Loading torch and the training code creates a great many objects that live as long as the process. While they
load, the collector walks all of them again each time the heap has grown by a quarter, freeing next to nothing;
after that, every full collection walks them once more. A process classforge owns (the `classforge` command and
the helper processes it starts) loads its libraries with collection off and then freezes what they created
(`gc.freeze`): later collections only walk the objects the command itself makes. A program that imports classforge
keeps its collector as it set it."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

_owned = False


def own_this_process() -> None:
    """Called by the entry points of classforge's own processes, never by the library on import."""
    global _owned
    _owned = True


@contextmanager
def loading_libraries() -> Iterator[None]:
    """Import inside this block; in a process classforge owns, collection is off meanwhile and what the imports
    created is frozen at the end."""
    if not _owned:
        yield
        return
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()
