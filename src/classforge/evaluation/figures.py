"""A run's figures, drawn by a second process while the run goes on.

Importing matplotlib and drawing a run's four figures take about a second of one core, at the end of a run whose
last steps (the unknown score, the scoring, the report) use one core and leave the other idle. `Figures.start`
starts `python -m classforge.evaluation.figures`, which loads matplotlib while the run works and draws each figure
as soon as the run sends its data; `wait` returns once every figure asked for is on disk. A figure the process
did not draw (it failed, or never started) is drawn in the run's own process, as everywhere else (`in_process`)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from classforge.core.heap import loading_libraries, own_this_process

# name -> (module, function(path, *args))
FIGURES = {"confusion": ("classforge.evaluation.report", "plot_confusion"),
           "reliability": ("classforge.evaluation.report", "plot_reliability"),
           "curves": ("classforge.evaluation.report", "plot_curves"),
           "open_set": ("classforge.evaluation.open_set", "plot_open_set")}


class Figures:
    """Draws FIGURES by name, in a second process once started (`start`), else at once in this one."""

    def __init__(self, proc: subprocess.Popen | None = None):
        self._proc = proc
        self._paths: set[str] = set()  # every figure asked for, drawn or to be drawn
        self._asked: list[dict] = []  # the jobs the process was sent, in order (a path drawn again: the last wins)

    @classmethod
    def start(cls) -> Figures:
        """A second process to draw in; this process draws where that is not possible (not a POSIX system) or not
        wanted (CLASSFORGE_NO_PRECHECK=1, which keeps all of a run's work in one process)."""
        if os.name != "posix" or os.environ.get("CLASSFORGE_NO_PRECHECK") == "1":
            return cls()
        try:
            proc = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL, text=True)
        except OSError:
            return cls()
        return cls(proc)

    def draw(self, figure: str, path: Path, *args) -> None:
        job = {"id": len(self._asked), "figure": figure, "path": str(path), "args": [_to_json(a) for a in args]}
        self._paths.add(str(path))
        if self._proc is not None:
            try:
                self._proc.stdin.write(json.dumps(job) + "\n")
                self._proc.stdin.flush()
                self._asked.append(job)
                return
            except (OSError, ValueError):  # the process is gone: this one draws what it left, and from now on
                self._finish()
        _draw(job)

    def asked(self, path: Path) -> bool:
        return str(path) in self._paths

    def wait(self) -> None:
        """Return once every figure asked for is drawn: by the process, or else here."""
        if self._proc is not None:
            self._finish()

    def _finish(self) -> None:
        """Let the process draw what it was sent, stop it, and draw here, in the order asked, what it did not."""
        drawn: set[int] = set()
        try:
            self._proc.stdin.close()
            for line in self._proc.stdout:
                drawn.add(json.loads(line).get("drawn"))
                if len(drawn) == len(self._asked):  # all there: no need to wait for the interpreter's teardown
                    break
        except (OSError, ValueError):
            pass
        self._stop()
        for job in self._asked:
            if job["id"] not in drawn:
                _draw(job)
        self._asked.clear()

    def close(self) -> None:
        """Stop the process, drawn or not (a run that stops on an error)."""
        if self._proc is not None:
            self._stop()

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            try:
                stream.close()
            except (OSError, ValueError):
                pass

    def __del__(self):  # however a run ends, it leaves no process behind
        if getattr(self, "_proc", None) is not None:
            self._stop()


def _to_json(a):
    if isinstance(a, np.ndarray):
        return {"array": a.tolist(), "dtype": str(a.dtype)}
    if isinstance(a, np.generic):
        return a.item()
    return a


def _from_json(a):
    if isinstance(a, dict) and set(a) == {"array", "dtype"}:
        return np.asarray(a["array"], dtype=a["dtype"])
    return a


def _draw(job: dict) -> None:
    module, name = FIGURES[job["figure"]]
    getattr(importlib.import_module(module), name)(Path(job["path"]), *[_from_json(a) for a in job["args"]])


def _child() -> None:
    """Draw each job read from stdin; report each figure drawn on stdout."""
    with loading_libraries():
        for module, _ in FIGURES.values():
            importlib.import_module(module)
        importlib.import_module("classforge.evaluation.report").pyplot()  # loaded before the first job arrives
    for line in sys.stdin:
        job = json.loads(line)
        try:
            _draw(job)
        except Exception:  # noqa: BLE001 - the run draws it again itself, and reports what goes wrong there
            continue
        sys.stdout.write(json.dumps({"drawn": job["id"]}) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    own_this_process()
    _child()
