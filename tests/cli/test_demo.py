"""`classforge demo`, the README's first command: the digits ship with scikit-learn, so it runs offline."""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.trains
def test_demo_trains_on_the_digits_and_writes_a_report(tmp_path):
    env = {**os.environ, "CLASSFORGE_CACHE": str(tmp_path / "cache"), "CLASSFORGE_QUIET": "1"}
    r = subprocess.run([sys.executable, "-m", "classforge", "demo", "--out", str(tmp_path / "run")], env=env,
                       capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["classes"] == 10 and summary["test"]["accuracy"] > 0.9
    assert (tmp_path / "run" / "report.html").stat().st_size > 10_000
    assert "Demo data: 1797 digit images" in r.stdout
