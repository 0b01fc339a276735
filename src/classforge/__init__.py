"""classforge: a folder of labelled images or sounds -> a trained, evaluated, exported and served classifier."""

from classforge.api import evaluate, export, load, predict, train

__all__ = ["train", "evaluate", "predict", "export", "load"]
__version__ = "0.1.0"
