"""The one console every command prints to, and how a command turns a user error into one red line."""

from __future__ import annotations

import typer
from rich.console import Console

console = Console(stderr=False)


def fail(e: Exception) -> None:
    console.print(f"[bold red]error:[/] {e}")
    raise typer.Exit(2)


def run_cmd(fn, *a, **kw):
    """Call fn; a ClassforgeError becomes `error: ...` and exit status 2, Ctrl-C exit status 130."""
    from classforge.core.errors import ClassforgeError

    try:
        return fn(*a, **kw)
    except ClassforgeError as e:
        fail(e)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        raise typer.Exit(130) from None


def split_list(text: str | None) -> list[str]:
    """'a, b,c' -> ['a', 'b', 'c'] (comma-separated option values)."""
    return [x.strip() for x in str(text or "").split(",") if x.strip()]
