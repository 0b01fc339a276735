"""Running a module's `add_commands(app)` as a standalone command line (the benchmark's own tools)."""

from __future__ import annotations


def run(add_commands) -> None:
    import typer

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    add_commands(app)

    @app.callback()
    def _root() -> None:
        pass

    app()
