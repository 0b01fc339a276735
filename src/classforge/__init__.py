"""classforge: a folder of labelled images or sounds -> a trained, evaluated, exported and served classifier."""

from importlib import import_module

__all__ = ["train", "evaluate", "predict", "export", "load", "audit", "update", "suggest"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The API loads on first use, so `import classforge` (and the command line's --help) stays fast.
    if name in __all__:
        return getattr(import_module("classforge.api"), name)
    raise AttributeError(f"module 'classforge' has no attribute {name!r}")
