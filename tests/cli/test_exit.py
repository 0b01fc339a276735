"""The `classforge` executable ends without tearing down torch's modules, and still behaves as sys.exit would."""

import os
import subprocess
import sys

import pytest


def _run(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # buffered, as a pipe usually is
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False,
                          env=env)


PRELUDE = ("import atexit, sys, torch\nfrom classforge.cli import exit_now\n"
           "atexit.register(lambda: print('handler ran', flush=False))\n")


@pytest.mark.parametrize("code,rc", [(0, 0), (3, 3), (None, 0)])
def test_exit_code_output_and_atexit_handlers_survive(code, rc):
    r = _run(PRELUDE + f"sys.stdout.write('unflushed output ')\nexit_now({code!r})\nprint('not reached')")
    assert r.returncode == rc
    assert r.stdout == "unflushed output handler ran\n"


def test_a_message_goes_to_stderr_with_status_1():
    r = _run(PRELUDE + "exit_now('error: no such run')")
    assert (r.returncode, r.stderr.strip(), r.stdout) == (1, "error: no such run", "handler ran\n")


def test_a_running_thread_is_waited_for():
    r = _run(PRELUDE + "import threading, time\n"
             "threading.Thread(target=lambda: (time.sleep(0.5), print('thread done', flush=True))).start()\n"
             "exit_now(0)")
    assert r.returncode == 0
    assert "thread done" in r.stdout


def test_the_installed_command_exits_with_the_commands_status(tmp_path):
    r = subprocess.run([sys.executable, "-m", "classforge", "predict", str(tmp_path), "x.jpg"], capture_output=True,
                       text=True, timeout=120, check=False, env={**os.environ, "COLUMNS": "300"})
    assert r.returncode == 2
    assert "not a classforge run directory" in r.stdout + r.stderr
