"""Command line: `classforge COMMAND`. Each command is a thin wrapper over the public API (classforge.api) that
prints to the shared console. Heavy libraries load inside the commands, so `--help` and `--version` stay fast."""

from __future__ import annotations

import contextlib
import inspect
import os
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import typer  # noqa: E402

from classforge.cli import (  # noqa: E402
    audit,
    basics,
    calibrate,
    card,
    compare,
    describe,
    export,
    grow,
    search,
    serve,
    track,
    train,
)
from classforge.cli.console import console  # noqa: E402
from classforge.core.errors import ClassforgeError  # noqa: E402

app = typer.Typer(
    help="classforge: turn a folder of labelled images or sounds into a trained, evaluated, exported and "
    "served classifier.\n\nTypical flow: inspect DATA -> train DATA --out RUN -> open RUN/report.html -> "
    "predict RUN file.jpg -> export RUN -> serve RUN.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        console.print(f"classforge {version('classforge')}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit"
    ),
) -> None:
    pass


# the order of `classforge --help`: the flow first, then analysis, then integrations
for _module in (basics, train, describe, export, card, serve, compare, search, calibrate, audit, grow, track):
    _module.add_commands(app)


def one_line_paragraphs(text: str) -> str:
    """A docstring with each paragraph on one line (lines that start a list item or are indented kept apart).
    Docstrings are wrapped at the source's width, and rich keeps those breaks in every paragraph after the first:
    in a narrower terminal that leaves ragged half-empty lines. One line per paragraph wraps to the terminal."""
    paragraphs = []
    for block in inspect.cleandoc(text).split("\n\n"):
        lines: list[str] = []
        for line in block.splitlines():
            if lines and not line.startswith(("- ", "* ", " ", "\b")):
                lines[-1] += " " + line.strip()
            else:
                lines.append(line.rstrip())
        paragraphs.append("\n".join(lines))
    return "\n\n".join(paragraphs)


for _command in app.registered_commands:
    _doc = _command.help or (_command.callback.__doc__ if _command.callback else None)
    if _doc:
        _command.help = one_line_paragraphs(_doc)


def main() -> None:
    from classforge.core.cpu_load import note_start
    from classforge.core.heap import own_this_process

    own_this_process()
    note_start()  # how busy the machine is gets measured while the command imports its libraries
    try:
        app()
    except ClassforgeError as e:  # raised outside run_cmd (e.g. while building a command's arguments)
        console.print(f"[bold red]error:[/] {e}")
        sys.exit(2)


def run() -> None:
    """The `classforge` executable: main(), then an exit that skips tearing down the interpreter's modules."""
    try:
        main()
        code: int | str | None = 0
    except SystemExit as e:
        code = e.code
    exit_now(code)


def exit_now(code: int | str | None) -> None:
    """End the process as sys.exit(code) would, minus the module teardown: with torch loaded, freeing every
    module's objects takes about half a second after the command is done. atexit handlers still run and output
    is flushed. Where torch is not loaded or a non-daemon thread still runs, a plain sys.exit."""
    import atexit
    import threading

    busy = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if "torch" not in sys.modules or busy:
        sys.exit(code)
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()  # noqa: SLF001 - the handlers sys.exit would run (log flushing, temp files)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code or 0)


if __name__ == "__main__":
    run()
