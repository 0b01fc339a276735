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


def key_values(pairs: list[str] | None, flag: str = "--set") -> dict:
    """['a=1', 'b=[2, 3]'] -> {'a': 1, 'b': [2, 3]}: values read as YAML, as in a config file."""
    from classforge.core.config import load_yaml
    from classforge.core.errors import ClassforgeError

    out = {}
    for kv in pairs or []:
        if "=" not in kv:
            raise ClassforgeError(f"{flag} expects key=value, got {kv!r}")
        k, v = kv.split("=", 1)
        out[k.strip()] = load_yaml(v)
    return out
