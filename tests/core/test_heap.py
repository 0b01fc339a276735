"""The garbage collector in classforge's own processes: off while the libraries load, then those objects frozen;
and a program that imports classforge keeps its collector as it set it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest


def _run(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1].split()  # the last line: what the code printed at the end


def test_a_program_that_imports_classforge_keeps_its_collector():
    assert _run("""
        import gc
        from classforge.core.heap import loading_libraries
        gc.set_threshold(500, 5, 5)
        with loading_libraries():
            enabled_inside = gc.isenabled()
            import json
        print(enabled_inside, gc.isenabled(), gc.get_freeze_count(), gc.get_threshold())
    """) == ["True", "True", "0", "(500,", "5,", "5)"]


def test_an_owned_process_loads_with_collection_off_and_freezes_what_loaded():
    enabled_inside, enabled_after, frozen, disabled_stays = _run("""
        import gc
        from classforge.core.heap import loading_libraries, own_this_process
        own_this_process()
        with loading_libraries():
            enabled_inside = gc.isenabled()
            import numpy
        enabled_after, frozen = gc.isenabled(), gc.get_freeze_count()
        gc.disable()
        with loading_libraries():
            import email.parser
        print(enabled_inside, enabled_after, frozen, gc.isenabled())
    """)
    assert (enabled_inside, enabled_after, disabled_stays) == ("False", "True", "False")
    assert int(frozen) > 10_000  # numpy's objects, and everything loaded before


@pytest.mark.trains
def test_the_train_command_freezes_the_libraries_it_loaded(shapes_dir, tmp_path):
    """`classforge train` loads torch and the training code inside loading_libraries: by the end of the run, the
    frozen objects include torch's (well over a hundred thousand), and collection is on again."""
    enabled, frozen, torch_loaded = _run(f"""
        import gc, os, sys
        os.environ["CLASSFORGE_CACHE"] = {str(tmp_path / "cache")!r}
        from classforge.cli import main
        sys.argv = ["classforge", "train", {str(shapes_dir)!r}, "--out", {str(tmp_path / "run")!r}, "--epochs", "3"]
        try:
            main()
        except SystemExit as e:
            assert not e.code, e.code
        print(gc.isenabled(), gc.get_freeze_count(), "torch" in sys.modules)
    """)
    assert (enabled, torch_loaded) == ("True", "True") and int(frozen) > 100_000


def test_the_figures_process_freezes_what_it_loaded():
    """The figures child (a process classforge owns) loads matplotlib with collection off and freezes it."""
    enabled, frozen, pyplot_loaded = _run("""
        import gc, io, runpy, sys
        sys.stdin = io.StringIO("")  # no figures to draw: the child loads its libraries and ends
        runpy.run_module("classforge.evaluation.figures", run_name="__main__")
        print(gc.isenabled(), gc.get_freeze_count(), "matplotlib.pyplot" in sys.modules)
    """)
    assert (enabled, pyplot_loaded) == ("True", "True") and int(frozen) > 10_000
