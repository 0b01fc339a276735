"""Command line: `classforge COMMAND`. Each command is a thin wrapper over the public API (classforge.api) that
prints to the shared console. Heavy libraries load inside the commands, so `--help` and `--version` stay fast."""

from __future__ import annotations

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

    note_start()  # how busy the machine is gets measured while the command imports its libraries
    try:
        app()
    except ClassforgeError as e:  # raised outside run_cmd (e.g. while building a command's arguments)
        console.print(f"[bold red]error:[/] {e}")
        sys.exit(2)


if __name__ == "__main__":
    main()
