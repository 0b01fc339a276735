"""`classforge describe`: the layer-by-layer anatomy of a backbone or a run's network."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from classforge.core.errors import ClassforgeError


def add_commands(app: typer.Typer) -> None:
    """Register `describe` on a Typer app."""

    @app.command("describe")
    def describe_command(
        target: Annotated[
            str,
            typer.Argument(
                metavar="MODEL_OR_RUN_DIR",
                help="A registered backbone name (see `classforge backbones`), any timm model name, or a run "
                "directory (model.json, or config.yaml + labels.json; model.safetensors, when present, "
                "must fit the rebuilt model).",
            ),
        ],
        input: Annotated[
            str | None,
            typer.Option(
                "--input",
                "-i",
                help="Per-sample input shape, e.g. 3x32x32 (default: from the backbone's "
                "input spec; audio: number of samples).",
            ),
        ] = None,
        num_classes: Annotated[
            int | None,
            typer.Option(
                "--num-classes",
                "-c",
                help="Classes of the Linear head (default: the run's classes, else 10).",
                min=1,
            ),
        ] = None,
        arg: Annotated[
            list[str] | None,
            typer.Option(
                "--arg",
                "-a",
                help="Backbone argument KEY=VALUE (YAML value), repeatable, e.g. "
                "-a widths=[16,32,60] -a block=residual.",
            ),
        ] = None,
        csv_path: Annotated[
            Path | None, typer.Option("--csv", help="Also write the rows and totals as CSV.")
        ] = None,
        json_path: Annotated[
            Path | None, typer.Option("--json", help="Also write the anatomy as JSON.")
        ] = None,
        max_rows: Annotated[
            int | None,
            typer.Option("--max-rows", help="Show at most this many rows in the terminal (files get all)."),
        ] = None,
    ) -> None:
        """Layer-by-layer anatomy: shapes, weights, parameters and additions / multiplications /
        comparisons / other operations per sample, with totals (conventions: classforge.models.anatomy)."""
        from rich.console import Console

        from classforge.api import describe as anatomy_of

        console = Console(width=None if sys.stdout.isatty() else 200)
        try:
            anatomy = anatomy_of(target, input, num_classes, arg)
        except ClassforgeError as e:
            Console(stderr=True).print(f"[red]error:[/red] {e}")
            raise typer.Exit(1) from None
        console.print(anatomy.table(max_rows=max_rows))
        console.print(anatomy.summary(), soft_wrap=True)
        if csv_path:
            console.print(f"wrote {anatomy.to_csv(csv_path)}")
        if json_path:
            console.print(f"wrote {anatomy.to_json(json_path)}")
